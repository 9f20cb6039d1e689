"""Pods for loopback runs: each stands at its own 127.0.0.x address, and
`serve --workloads` learns them from a `kubectl get pods -o yaml`-style List,
`serve --kube` from the same objects in the API emulator."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    service_account: str
    ip: str  # the pod IP: its sidecar dials the gateway from this address
    labels: Mapping[str, str] = field(default_factory=dict)
    # status.podIPs as the API reports it (dual-stack: one address per family,
    # in any order); empty: just `ip`. status.podIP is the first of them.
    pod_ips: tuple[str, ...] = ()

    @property
    def workload(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def pod_object(p: Pod) -> dict[str, Any]:
    """The Pod as the API server holds it (the fields egress-authz reads)."""
    ips = p.pod_ips or (p.ip,)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "labels": dict(p.labels)},
        "spec": {"serviceAccountName": p.service_account, "containers": [
            {"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]},
    }


def pods_manifest(pods: Iterable[Pod]) -> str:
    """A `kubectl get pods -o yaml` style List: what `serve --workloads` reads."""
    return yaml.safe_dump(
        {"apiVersion": "v1", "kind": "List", "items": [pod_object(p) for p in pods]},
        sort_keys=False,
    )
