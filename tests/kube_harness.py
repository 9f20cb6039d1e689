"""Shared pieces of the Kubernetes tests: the emulator, a running source, decisions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.engine import decide
from authz.kube.client import KubeApi
from authz.kube.source import KubePolicySource, KubeSettings
from authz.model import Decision, Destination, Identity, Protocol
from authz.observe.metrics import Metrics
from authz.store import PolicyStore
from authz.workloads import WorkloadIndex
from tests.kube_emulator import KubeEmulator

SVC_NS = "egress-authz"


def write_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig at `path` whose one context reaches `server` with a token."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "e",
        "clusters": [{"name": "e", "cluster": {"server": server}}],
        "contexts": [{"name": "e", "context": {"cluster": "e", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "t"}}]}))
    return path


def policy_cm(ns: str, name: str, rules: list[dict[str, Any]], *, mode: str = "enforce",
              labels: dict[str, str] | None = None, text: str | None = None) -> dict[str, Any]:
    body = text if text is not None else yaml.safe_dump({"mode": mode, "rules": rules})
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns,
                         "labels": labels or {"egress-authz.io/policy": "true"}},
            "data": {"policy.yaml": body}}


def rule(name: str, *hosts: str, ports: list[int] | None = None,
         labels: dict[str, str] | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"name": name, "hosts": list(hosts), "ports": ports or [443]}
    if labels:
        r["workloads"] = {"matchLabels": labels}
    return r


def pod(ns: str, name: str, ip: str, *, sa: str = "default",
        labels: dict[str, str] | None = None, phase: str = "Running") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": phase, "podIP": ip}}


@dataclass
class Replica:
    """One egress-authz process's Kubernetes side, against the emulator."""

    emu: KubeEmulator
    store: PolicyStore = field(default_factory=PolicyStore)
    index: WorkloadIndex = field(default_factory=WorkloadIndex)
    errors: list[str] = field(default_factory=list)
    source: KubePolicySource | None = None
    # Its own registry: tests read what this replica counted, never the process's set.
    metrics: Metrics = field(default_factory=Metrics)

    def api(self) -> KubeApi:
        return KubeApi(self.emu.api_client(), service_ns=SVC_NS)

    def start(self, **settings: Any) -> KubePolicySource:
        s = KubeSettings(service_namespace=SVC_NS, backoff_cap=0.5, watch_timeout=30,
                         **settings)
        self.source = KubePolicySource(self.api(), self.index, s, metrics=self.metrics)
        self.source.start(self.store, self.errors.append)
        return self.source

    def decide(self, ns: str, host: str, *, ip: str = "", sa: str = "default",
               port: int = 443) -> Decision:
        assert self.store.current is not None, "no policy loaded"
        identity = Identity(principal=f"spiffe://cluster.local/ns/{ns}/sa/{sa}", source_ip=ip,
                            workload=self.index.lookup(ip) if ip else None)
        return decide(self.store.current, identity,
                      Destination(port=port, protocol=Protocol.TLS, sni=host))

    def allows(self, ns: str, host: str, **kw: Any) -> bool:
        return self.store.current is not None and self.decide(ns, host, **kw).allowed

    def stop(self) -> None:
        if self.source is not None:
            self.source.stop()


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as e:
        yield e


@pytest.fixture
def replica(emu: KubeEmulator) -> Iterator[Replica]:
    r = Replica(emu)
    yield r
    r.stop()
