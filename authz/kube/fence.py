"""Layer 3 in `serve --kube`: which namespaces opted in to the fence NetworkPolicy (the
registry writer applies it), and which namespaces rely on a wildcard host while no
NetworkPolicy fences them (reported: Warning Event on the policy ConfigMaps, a gauge,
a log line).

Watches Namespaces labelled egress-authz.io/egress-fence=true and every NetworkPolicy;
re-evaluates on every policy snapshot and every NetworkPolicy change. Events are posted
by the Lease holder only (one report per cluster, not one per replica), once when a
namespace becomes unfenced, again only after it was fenced in between.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from ..engine import Snapshot
from ..fence import FENCE_LABEL, unfenced_wildcards, wildcard_hosts
from ..model import NamespacePolicy
from ..observe.metrics import Metrics
from ..store import PolicyStore
from .client import KubeApi, KubeError, Obj
from .watch import ApiHealth, Backoff, Reflector

log = logging.getLogger(__name__)

REASON_UNFENCED = "WildcardUnfenced"
COMPONENT = "egress-authz"


class FenceMonitor:
    def __init__(self, api: KubeApi, store: PolicyStore, *, is_leader: Callable[[], bool],
                 health: ApiHealth | None = None, backoff_cap: float = 10.0,
                 watch_timeout: int = 300, instance: str = COMPONENT,
                 metrics: Metrics | None = None) -> None:
        self.api, self.store, self.is_leader = api, store, is_leader
        # The metrics go with the health its reflectors share (as in KubePolicySource).
        health = health or ApiHealth(metrics)
        self.metrics = metrics or health.metrics
        self.instance = instance
        self.on_opt_in: Callable[[], None] = lambda: None  # the writer's poke
        self.events_posted = 0
        self.unfenced: dict[str, list[str]] = {}  # namespace -> its wildcard policies
        self._lock = threading.Lock()
        self._opted: set[str] = set()
        self._netpols: dict[str, dict[str, Obj]] = {}
        self._reported: set[str] = set()
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.namespaces = Reflector(api, "Namespace", on_sync=self._ns_synced,
                                    on_event=self._ns_event, label_selector=f"{FENCE_LABEL}=true",
                                    health=health, backoff=Backoff(cap=backoff_cap),
                                    watch_timeout=watch_timeout, name="fenced namespaces")
        self.policies = Reflector(api, "NetworkPolicy", on_sync=self._np_synced,
                                  on_event=self._np_event, health=health,
                                  backoff=Backoff(cap=backoff_cap), watch_timeout=watch_timeout,
                                  name="network policies")

    def opted_in(self) -> set[str] | None:
        """Namespaces that asked for the fence; None until the first list (never prune
        fences on an empty answer)."""
        if not self.namespaces.synced.is_set():
            return None
        with self._lock:
            return set(self._opted)

    def start(self) -> None:
        self.store.subscribe(self._on_snapshot)
        self.namespaces.start()
        self.policies.start()
        self._thread = threading.Thread(target=self._run, name="fence monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        self.namespaces.stop()
        self.policies.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ------------------------------------------------------------ watches

    def _on_snapshot(self, _snapshot: Snapshot) -> None:
        self._dirty.set()

    def _ns_synced(self, items: list[Obj]) -> None:
        with self._lock:
            self._opted = {o["metadata"]["name"] for o in items}
        self.on_opt_in()

    def _ns_event(self, type_: str, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        with self._lock:
            # DELETED also when the label is removed: the object left the selection.
            (self._opted.discard if type_ == "DELETED" else self._opted.add)(name)
        self.on_opt_in()

    def _np_synced(self, items: list[Obj]) -> None:
        with self._lock:
            self._netpols = {}
            for o in items:
                self._netpols.setdefault(o["metadata"]["namespace"], {})[
                    o["metadata"]["name"]] = o
        self._dirty.set()

    def _np_event(self, type_: str, obj: Obj) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        with self._lock:
            if type_ == "DELETED":
                self._netpols.get(ns, {}).pop(name, None)
            else:
                self._netpols.setdefault(ns, {})[name] = obj
        self._dirty.set()

    # ------------------------------------------------------------ evaluation

    def _run(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(30.0)
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self.evaluate()
            except Exception:
                log.exception("evaluating NetworkPolicy fences failed")

    def evaluate(self) -> None:
        snapshot = self.store.current
        if snapshot is None or not self.policies.synced.is_set():
            return
        with self._lock:
            netpols = {ns: list(by_name.values()) for ns, by_name in self._netpols.items()}
        found = unfenced_wildcards(snapshot.policy_set.policies, netpols)
        self.unfenced = {ns: [str(p.source) for p in ps] for ns, ps in found.items()}
        self.metrics.unfenced_wildcard_namespaces.set(len(found))
        new = set(found) - self._reported
        for ns in sorted(new):
            log.warning("namespace %s allows wildcard hosts but no NetworkPolicy fences its "
                        "egress: its pods can reach matching hosts around the egress gateway "
                        "(label it %s=true, or see docs/install.md)", ns, FENCE_LABEL)
        if self.is_leader():
            for ns in sorted(new):
                for p in found[ns]:
                    self._post(p)
            self._reported = set(found)  # fenced since: report again if it comes back
        else:
            self._reported &= set(found)

    def _post(self, p: NamespacePolicy) -> None:
        message = (f"{p.source}: allows {', '.join(wildcard_hosts(p))}, which Istio cannot route "
                   "through the egress gateway, and no NetworkPolicy fences this namespace's "
                   f"egress: pods can reach such hosts directly. Label the namespace "
                   f"{FENCE_LABEL}=true, or add a NetworkPolicy (docs/install.md, layer 3).")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{p.source.name}.", "namespace": p.source.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap", "name": p.source.name,
                               "namespace": p.source.namespace, "uid": p.uid},
            "type": "Warning", "reason": REASON_UNFENCED, "message": message,
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": self.instance, "firstTimestamp": now, "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.api.create("Event", p.source.namespace, event)
            self.events_posted += 1
        except KubeError as e:
            log.warning("could not post %s Event on %s: %s", REASON_UNFENCED, p.source, e)
