"""Policies from ConfigMaps and identities from Pods, kept in step by watches.

Implements the PolicySource interface of authz.sources: ConfigMaps labelled
egress-authz.io/policy=true in every namespace (optionally only namespaces matching a
label selector) plus the cluster-tier ConfigMap in the service's namespace, validated one
by one into the PolicyStore; live Pods into the WorkloadIndex. A ConfigMap that fails
validation keeps its last good policy and gets a Warning Event; fixed, a Normal one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..hosts import DEFAULT_CLUSTER_DOMAIN
from ..loader import build_policy_set
from ..model import POLICY_LABEL, TIER_CLUSTER, TIER_LABEL, ConfigMapRef, NamespacePolicy
from ..observe.metrics import Metrics
from ..policy import PolicyError, is_policy_configmap, parse_configmap
from ..store import PolicyStore
from ..workloads import WorkloadIndex, workload_from_pod
from .client import KubeApi, Obj
from .events import EventRecorder, EventSettings
from .watch import ApiHealth, Backoff, Reflector

log = logging.getLogger(__name__)

REASON_INVALID = "PolicyInvalid"
REASON_ACCEPTED = "PolicyAccepted"
# Host patterns over all policy ConfigMaps of one namespace (the service's own, the
# cluster tier, is exempt). The per-ConfigMap caps bound one object, not how many an
# owner creates: a maximal ConfigMap costs ~10 MiB compiled, so ~50 of them would
# take every replica over the chart's 512 MiB. 20,000 is ~5 MiB, and hundreds of
# times what a namespace's egress needs.
MAX_NAMESPACE_HOSTS = 20_000
COMPONENT = "egress-authz"


@dataclass(frozen=True)
class KubeSettings:
    """How the Kubernetes source watches; built once from the command line."""

    service_namespace: str = "egress-authz"
    """Where the cluster-tier ConfigMap and the leader Lease live."""
    namespace_selector: str | None = None
    """Label selector on Namespaces: only their policies count (None: all namespaces)."""
    watch_timeout: int = 300
    """Seconds the server keeps one watch open before we re-watch (a server-side timeout)."""
    backoff_cap: float = 10.0
    """Longest wait between reconnection attempts while the API server is unreachable."""
    publish_interval: float = 0.05
    """Changes within this many seconds are compiled into one snapshot."""
    events: EventSettings = field(default_factory=EventSettings)
    """How Events on policy ConfigMaps are aggregated and paced (authz.kube.events)."""
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    """The cluster's DNS domain: namespace policies may not name hosts under it."""


class KubePolicySource:
    """The PolicySource of `serve --kube`; also feeds the WorkloadIndex."""

    name = "kubernetes"

    def __init__(self, api: KubeApi, index: WorkloadIndex, settings: KubeSettings | None = None,
                 *, health: ApiHealth | None = None, metrics: Metrics | None = None) -> None:
        self.api, self.index = api, index
        self.settings = settings or KubeSettings(service_namespace=api.service_ns)
        # The metrics go with the health every reflector shares (the process's own
        # set unless `metrics` or a `health` built on other metrics is handed in).
        self.health = health or ApiHealth(metrics)
        self.metrics = metrics or self.health.metrics
        self._lock = threading.Lock()
        self._cms: dict[ConfigMapRef, tuple[str, Obj]] = {}  # ref -> (reflector, object)
        self._good: dict[ConfigMapRef, NamespacePolicy] = {}  # last policy that validated
        self._parsed: dict[ConfigMapRef, str] = {}  # ref -> resourceVersion parsed last
        self._invalid: dict[ConfigMapRef, str] = {}  # ref -> message reported last
        self._namespaces: set[str] | None = None  # None: no selector
        self._published: tuple[NamespacePolicy, ...] | None = None
        self._store: PolicyStore | None = None
        self._on_error: Callable[[str], None] = log.error
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._publisher: threading.Thread | None = None
        self.reflectors: list[Reflector] = []
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()
        # Validation runs under self._lock; the recorder only queues there and posts
        # from its own thread, so a slow Events API never delays a policy update.
        self.events = EventRecorder(api, component=COMPONENT, instance=self.instance,
                                    settings=self.settings.events)

    # ------------------------------------------------------------ PolicySource

    def start(self, store: PolicyStore, on_error: Callable[[str], None]) -> None:
        self._store, self._on_error = store, on_error
        s = self.settings

        def reflector(kind: str, name: str, on_sync: Callable[[list[Obj]], None],
                      on_event: Callable[[str, Obj], None], **kw: str | None) -> Reflector:
            return Reflector(self.api, kind, on_sync=on_sync, on_event=on_event,
                             health=self.health, watch_timeout=s.watch_timeout,
                             backoff=Backoff(cap=s.backoff_cap), name=name, **kw)

        if s.namespace_selector:
            self.reflectors.append(reflector(
                "Namespace", "namespaces", self._namespaces_synced, self._namespace_event,
                label_selector=s.namespace_selector))
        for name, selector in (("policies", f"{POLICY_LABEL}=true"),
                               ("cluster-policy", f"{TIER_LABEL}={TIER_CLUSTER}")):
            self.reflectors.append(reflector(
                "ConfigMap", name, _bind_sync(self._cms_synced, name),
                _bind_event(self._cm_event, name), label_selector=selector))
        self.reflectors.append(reflector(
            "Pod", "pods", self._pods_synced, self._pod_event,
            # Pending Pods with an address count too: init containers run behind a
            # native sidecar before the Pod is Running. Ended Pods give theirs back.
            field_selector="status.phase!=Succeeded,status.phase!=Failed"))
        self._publisher = threading.Thread(target=self._publish_loop, name="kube publish",
                                           daemon=True)
        self._publisher.start()
        self.events.start()
        for r in self.reflectors:
            r.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        for r in self.reflectors:
            r.stop()
        self.events.stop()

    def ready(self) -> bool:
        """After the first full lists were applied; stays true through outages."""
        return self._published is not None

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready() and time.monotonic() < deadline:
            self._stop.wait(0.01)
        return self.ready()

    # ------------------------------------------------------------ ConfigMaps

    def _cms_synced(self, origin: str, items: list[Obj]) -> None:
        with self._lock:
            for ref in [r for r, (o, _) in self._cms.items() if o == origin]:
                self._forget(ref)
            for obj in items:
                self._cms[_ref(obj)] = (origin, obj)
            self._revalidate()
        self._dirty.set()

    def _cm_event(self, origin: str, type_: str, obj: Obj) -> None:
        ref = _ref(obj)
        with self._lock:
            if type_ == "DELETED":
                if self._cms.get(ref, (origin, None))[0] == origin:
                    self._forget(ref)
            else:
                self._cms[ref] = (origin, obj)
                self._revalidate()
        self._dirty.set()

    def _forget(self, ref: ConfigMapRef) -> None:
        self._cms.pop(ref, None)
        self._good.pop(ref, None)
        self._parsed.pop(ref, None)
        self._invalid.pop(ref, None)

    def _served(self, ref: ConfigMapRef, obj: Obj) -> bool:
        """Whether a ConfigMap counts at all (lock held). Others are never parsed: a
        namespace outside the selector must not cost the service anything."""
        if not is_policy_configmap(obj):  # the watch's label selector, checked again
            return False
        if ref.namespace == self.settings.service_namespace or not self.settings.namespace_selector:
            return True
        return self._namespaces is not None and ref.namespace in self._namespaces

    def _revalidate(self) -> None:
        """Parse every served ConfigMap whose resourceVersion is new (lock held)."""
        for ref, (_, obj) in self._cms.items():
            rv = str(obj.get("metadata", {}).get("resourceVersion", ""))
            if self._parsed.get(ref) == rv or not self._served(ref, obj):
                continue
            self._parsed[ref] = rv
            try:
                policy = parse_configmap(obj, cluster_namespace=self.settings.service_namespace,
                                         cluster_domain=self.settings.cluster_domain)
                self._within_namespace_cap(ref, policy)
            except PolicyError as e:
                self.metrics.policy_errors.labels("kubernetes").inc()
                message = str(e)
                kept = "keeping its last good policy" if ref in self._good else "it adds nothing"
                self._on_error(f"ConfigMap {ref} rejected, {kept}:\n  {message}")
                if self._invalid.get(ref) != message:
                    self._invalid[ref] = message
                    self._post_event(obj, "Warning", REASON_INVALID, message)
                continue
            self._good[ref] = policy
            if ref in self._invalid:
                del self._invalid[ref]
                self._post_event(obj, "Normal", REASON_ACCEPTED,
                                 f"policy accepted: {len(policy.rules)} rule(s) in force")

    def _within_namespace_cap(self, ref: ConfigMapRef, policy: NamespacePolicy) -> None:
        """Raise PolicyError when `policy` would take its namespace over
        MAX_NAMESPACE_HOSTS (lock held). Rejected like any invalid ConfigMap: an
        Event, and its last good version stays; it is read again when edited."""
        if ref.namespace == self.settings.service_namespace:
            return
        others = sum(len(r.hosts) for other, p in self._good.items()
                     if other.namespace == ref.namespace and other != ref for r in p.rules)
        total = others + sum(len(r.hosts) for r in policy.rules)
        if total > MAX_NAMESPACE_HOSTS:
            raise PolicyError(str(ref), [
                f"namespace {ref.namespace} would hold {total} host patterns over its "
                f"policy ConfigMaps, over the limit of {MAX_NAMESPACE_HOSTS} per namespace; "
                "remove hosts or ConfigMaps"])

    # ------------------------------------------------------------ Namespaces

    def _namespaces_synced(self, items: list[Obj]) -> None:
        with self._lock:
            self._namespaces = {o["metadata"]["name"] for o in items}
            self._revalidate()
        self._dirty.set()

    def _namespace_event(self, type_: str, obj: Obj) -> None:
        with self._lock:
            names = set(self._namespaces or ())
            if type_ == "DELETED":  # also: the Namespace no longer matches the selector
                names.discard(obj["metadata"]["name"])
            else:
                names.add(obj["metadata"]["name"])
            self._namespaces = names
            self._revalidate()
        self._dirty.set()

    # ------------------------------------------------------------ Pods

    def _pods_synced(self, items: list[Obj]) -> None:
        self.index.replace_all(w for w in map(workload_from_pod, items) if w is not None)
        self._dirty.set()

    def _pod_event(self, type_: str, obj: Obj) -> None:
        meta = obj.get("metadata", {})
        w = workload_from_pod(obj) if type_ != "DELETED" else None
        if w is None:
            self.index.remove(meta.get("namespace", ""), meta.get("name", ""))
        else:
            self.index.upsert(w)

    # ------------------------------------------------------------ publishing

    def _publish_loop(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait()
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self._publish()
            except Exception:  # keep the last snapshot; the next change retries
                log.exception("publishing policies failed")
            self._stop.wait(self.settings.publish_interval)

    def _publish(self) -> None:
        if not all(r.synced.is_set() for r in self.reflectors):
            return  # readiness means the first *full* lists, never a partial view
        with self._lock:
            allowed = self._namespaces
            svc = self.settings.service_namespace
            policies = tuple(sorted(
                (p for p in self._good.values()
                 if allowed is None or p.namespace in allowed or p.namespace == svc),
                key=lambda p: (p.source.namespace, p.source.name)))
        if policies == self._published:
            return
        assert self._store is not None
        snapshot = self._store.publish(build_policy_set(policies))
        self._published = policies
        log.info("policy revision %d: %d ConfigMap(s) from the cluster",
                 snapshot.revision, len(policies))

    # ------------------------------------------------------------ Events

    def _post_event(self, cm: Obj, type_: str, reason: str, message: str) -> None:
        self.events.record(cm, type_, reason, message)  # queued: posted off this lock


def _ref(obj: Obj) -> ConfigMapRef:
    meta = obj.get("metadata", {})
    return ConfigMapRef(meta.get("namespace") or "default", meta.get("name") or "")


def _bind_sync(fn: Callable[[str, list[Obj]], None], origin: str
               ) -> Callable[[list[Obj]], None]:
    return lambda items: fn(origin, items)


def _bind_event(fn: Callable[[str, str, Obj], None], origin: str
                ) -> Callable[[str, Obj], None]:
    return lambda type_, obj: fn(origin, type_, obj)
