"""Source IP -> Workload: the labels behind a caller's address.

Fed by a Pod watch in a cluster or by Pod manifests on disk for local runs;
read on every Check. Updates replace single dictionary entries, which is
atomic for readers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .model import Workload


class WorkloadIndex:
    def __init__(self) -> None:
        self._by_ip: dict[str, Workload] = {}
        self._ip_of_pod: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()  # writers only; lookups read the dict directly

    def lookup(self, ip: str) -> Workload | None:
        return self._by_ip.get(ip)

    def __len__(self) -> int:
        return len(self._by_ip)

    def upsert(self, workload: Workload) -> None:
        """Add or update a Pod; a Pod whose IP changed leaves its old IP."""
        key = (workload.namespace, workload.name)
        with self._lock:
            old_ip = self._ip_of_pod.get(key)
            if old_ip is not None and old_ip != workload.ip:
                self._by_ip.pop(old_ip, None)
            if workload.ip:
                self._by_ip[workload.ip] = workload
                self._ip_of_pod[key] = workload.ip
            else:
                self._ip_of_pod.pop(key, None)

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            ip = self._ip_of_pod.pop((namespace, name), None)
            if ip is not None and (w := self._by_ip.get(ip)) and w.name == name:
                del self._by_ip[ip]

    def replace_all(self, workloads: Iterable[Workload]) -> None:
        """Install a complete list (after a relist): Pods not in it are gone."""
        by_ip: dict[str, Workload] = {}
        ip_of_pod: dict[tuple[str, str], str] = {}
        for w in workloads:
            if w.ip:
                by_ip[w.ip] = w
                ip_of_pod[(w.namespace, w.name)] = w.ip
        with self._lock:
            self._by_ip = by_ip
            self._ip_of_pod = ip_of_pod


def workload_from_pod(pod: Mapping[str, Any]) -> Workload | None:
    """A Pod manifest (dict, as in YAML or the API) -> Workload, or None when it
    does not count: only Running Pods with an IP carry an identity."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP") or ""
    phase = status.get("phase")
    if not ip or phase not in (None, "Running"):
        return None
    labels = meta.get("labels") or {}
    return Workload(
        namespace=meta.get("namespace") or "default",
        service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
        labels=MappingProxyType({str(k): str(v) for k, v in labels.items()}),
        name=meta.get("name") or "",
        ip=ip,
    )
