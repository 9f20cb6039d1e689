"""Pods for loopback runs: each stands at its own 127.0.0.x address, and
`serve --workloads` learns them from a `kubectl get pods -o yaml`-style List."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    service_account: str
    ip: str  # the pod IP: its sidecar dials the gateway from this address
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def workload(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def pods_manifest(pods: Iterable[Pod]) -> str:
    """A `kubectl get pods -o yaml` style List: what `serve --workloads` reads."""
    items = []
    for p in pods:
        labels = "".join(f"\n        {k}: {v}" for k, v in p.labels.items())
        items.append(
            f"""\
  - apiVersion: v1
    kind: Pod
    metadata:
      name: {p.name}
      namespace: {p.namespace}
      labels:{labels or " {}"}
    spec:
      serviceAccountName: {p.service_account}
      containers: [{{name: app, image: app}}]
    status:
      phase: Running
      podIP: {p.ip}
"""
        )
    return "apiVersion: v1\nkind: List\nitems:\n" + "".join(items)
