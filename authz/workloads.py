"""Source IP -> Workload: the Pod behind a caller's address.

Fed by a Pod watch in a cluster or by Pod manifests on disk for local runs;
read on every Check. Addresses are stored in canonical form (authz.identity
.canonical_ip) when a Pod is indexed, so a lookup is one dictionary read;
only an address that misses is canonicalised and tried again. Writers hold a
lock and replace single dictionary entries (or the whole dictionary), which
readers see atomically.

An address claimed by two live Pods at once (a reused IP whose old Pod's
end has not been seen yet) belongs to neither until one goes: the index never
guesses which Pod's labels a caller has.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .identity import canonical_ip
from .model import Workload

PodKey = tuple[str, str]  # (namespace, name)

# Phases in which a Pod holds its address. Pending counts once it has one:
# init containers (and a native sidecar) run before the Pod is Running.
# Succeeded and Failed Pods have given it back; Unknown (node lost) is not
# vouched for.
LIVE_PHASES = frozenset({None, "Pending", "Running"})

# A Pod has at most one address per family (Kubernetes validates podIPs so);
# a manifest listing more is not a Pod's and its extra addresses are ignored.
MAX_POD_IPS = 2


class WorkloadIndex:
    """Deliberately not a container (no __len__): an empty index is still the
    index, and `index or WorkloadIndex()` must never swap it for another one."""

    def __init__(self) -> None:
        self._by_ip: dict[str, Workload] = {}  # read on every Check, without the lock
        self._pods: dict[PodKey, Workload] = {}
        self._claims: dict[str, set[PodKey]] = {}  # address -> Pods that list it
        self._lock = threading.Lock()  # writers only

    def lookup(self, ip: str) -> Workload | None:
        found = self._by_ip.get(ip)
        if found is None:
            # Envoy writes addresses canonically; another spelling is rare.
            canonical = canonical_ip(ip)
            if canonical is not None and canonical != ip:
                return self._by_ip.get(canonical)
        return found

    @property
    def pod_count(self) -> int:
        return len(self._pods)

    def upsert(self, workload: Workload) -> None:
        """Add or update a Pod; addresses it no longer has are released."""
        key = (workload.namespace, workload.name)
        addresses = pod_addresses(workload)
        if not addresses:
            self.remove(*key)
            return
        with self._lock:
            old = self._pods.get(key)
            before = pod_addresses(old) if old is not None else ()
            self._pods[key] = workload
            for ip in before:
                if ip not in addresses:
                    self._release(ip, key)
            for ip in addresses:
                self._claims.setdefault(ip, set()).add(key)
                self._settle(ip)

    def remove(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        with self._lock:
            old = self._pods.pop(key, None)
            for ip in pod_addresses(old) if old is not None else ():
                self._release(ip, key)

    def replace_all(self, workloads: Iterable[Workload]) -> None:
        """Install a complete list (after a relist): Pods not in it are gone."""
        pods: dict[PodKey, Workload] = {}
        for w in workloads:
            if pod_addresses(w):
                pods[(w.namespace, w.name)] = w
        claims: dict[str, set[PodKey]] = {}
        for key, w in pods.items():
            for ip in pod_addresses(w):
                claims.setdefault(ip, set()).add(key)
        by_ip = {ip: pods[next(iter(keys))] for ip, keys in claims.items() if len(keys) == 1}
        with self._lock:
            self._pods, self._claims, self._by_ip = pods, claims, by_ip

    # ------------------------------------------------------------ lock held

    def _release(self, ip: str, key: PodKey) -> None:
        keys = self._claims.get(ip)
        if keys is not None:
            keys.discard(key)
            self._settle(ip)

    def _settle(self, ip: str) -> None:
        """Point `ip` at its one claimant, or at nobody (none, or ambiguous)."""
        keys = self._claims.get(ip)
        if keys and len(keys) == 1:
            self._by_ip[ip] = self._pods[next(iter(keys))]
            return
        if not keys:
            self._claims.pop(ip, None)
        self._by_ip.pop(ip, None)


def pod_addresses(workload: Workload) -> tuple[str, ...]:
    """The canonical addresses a Workload is indexed under (invalid ones dropped)."""
    found: list[str] = []
    for text in (workload.ip, *workload.ips):
        ip = canonical_ip(text) if text else None
        if ip is not None and ip not in found:
            found.append(ip)
    return tuple(found)


def workload_from_pod(pod: Mapping[str, Any]) -> Workload | None:
    """A Pod manifest (dict, as in YAML or the API) -> Workload, or None when it
    does not count: only live Pods (LIVE_PHASES) with an address of their own
    carry an identity. A hostNetwork Pod shares its node's address with every other
    such Pod (and the node), so that address says nothing about who calls."""
    meta = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    status = _mapping(pod.get("status"))
    phase = status.get("phase")
    if phase not in LIVE_PHASES or spec.get("hostNetwork") is True:
        return None
    ips: list[str] = []
    listed = status.get("podIPs")
    for entry in listed if isinstance(listed, list) else ():
        text = entry.get("ip") if isinstance(entry, Mapping) else None
        ip = canonical_ip(text) if isinstance(text, str) else None
        if ip is not None and ip not in ips and len(ips) < MAX_POD_IPS:
            ips.append(ip)
    primary_text = status.get("podIP")
    primary = canonical_ip(primary_text) if isinstance(primary_text, str) else None
    if primary is not None and primary not in ips:
        ips.insert(0, primary)  # podIP is podIPs[0] by API contract; trust it if they differ
        del ips[MAX_POD_IPS:]
    if not ips:
        return None
    labels = _mapping(meta.get("labels"))
    return Workload(
        namespace=str(meta.get("namespace") or "default"),
        service_account=str(
            spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        ),
        labels=MappingProxyType({str(k): str(v) for k, v in labels.items()}),
        name=str(meta.get("name") or ""),
        ip=primary or ips[0],
        ips=tuple(ips),
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}
