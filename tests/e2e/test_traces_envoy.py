"""A client's W3C trace, through a real Envoy gateway, becomes the parent of our span.

    client (traceparent) ──mTLS+HTTP──▶ gateway Envoy ──Check──▶ egress-authz serve
                                                                     │ OTLP/gRPC
                                                                     ▼
                                                        collector stub (127.0.0.1)

The service runs as `egress-authz serve` with only the standard OTEL_*
variables set, exactly as in a pod; spans leave through its exporter
process. The admin endpoint and `egress-authz traces` see the same trace id.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from authz.testing.envoy import free_port
from authz.testing.mesh import LoopbackMesh
from authz.testing.service import ServiceProcess
from tests.e2e.conftest import PODS, pods_manifest, ports_of, shop_policy
from tests.test_tracing import CollectorStub, _attrs

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(180)]

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _spans_by_host(collector: CollectorStub, hosts: set[str], timeout: float = 90.0
                   ) -> dict[str, Any]:
    """The collector's spans by host, once one has arrived for each of `hosts`.

    Spans cross the exporter process and its batch delay, which a loaded machine
    stretches: wait for the ones this test needs rather than for a span count.
    """
    deadline = time.monotonic() + timeout
    while True:
        by_host = {_attrs(s)["egress_authz.host"]: s for s in list(collector.spans)}
        if hosts <= by_host.keys() or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    missing = hosts - by_host.keys()
    assert not missing, f"no span reached the collector for {sorted(missing)}"
    return by_host


@dataclass
class Traced:
    mesh: LoopbackMesh
    service: ServiceProcess
    collector: CollectorStub
    admin_url: str


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    root = tmp_path_factory.mktemp("traces-e2e")
    collector = CollectorStub()
    authz_port, admin_port = free_port(), free_port()
    mesh = LoopbackMesh(authz_port, workdir=root / "mesh")
    policies = root / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(shop_policy(ports_of((mesh.http_port, mesh.tls_port))))
    (root / "pods.yaml").write_text(pods_manifest(PODS))
    service = ServiceProcess(
        policies,
        authz_port,
        workloads=root / "pods.yaml",
        admin_port=admin_port,
        log_path=root / "service.log",
    )
    with pytest.MonkeyPatch.context() as env, mesh:
        for key, value in collector.env.items():  # what a pod spec would set
            env.setenv(key, value)
        service.start()
        try:
            yield Traced(mesh, service, collector, f"http://127.0.0.1:{admin_port}")
        finally:
            service.stop()
            collector.stop()


def test_client_traceparent_is_our_parent(traced: Traced) -> None:
    """The span of a Check for a request carrying traceparent is a child of the
    client's span, in the client's trace, for an allow and for a denial; the
    decision log / admin API name the same trace."""
    allowed = traced.mesh.http(
        "api.kadath.io",
        namespace="shop",
        service_account="cart",
        source_ip="127.0.0.2",
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
    )
    assert allowed.status == 200, allowed
    denied = traced.mesh.http(
        "denied.example",
        namespace="shop",
        service_account="cart",
        source_ip="127.0.0.2",
        headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01", "tracestate": "app=1"},
    )
    assert denied.status == 403, denied
    denied_id = json.loads(denied.body)["decision_id"]

    by_host = _spans_by_host(traced.collector, {"api.kadath.io", "denied.example"})
    for host, verdict in (("api.kadath.io", "allow"), ("denied.example", "deny")):
        span = by_host[host]
        assert span.name == "egress-authz.check" and span.kind == 2  # SERVER
        assert span.trace_id.hex() == CLIENT_TRACE
        assert span.parent_span_id.hex() == CLIENT_SPAN
        assert _attrs(span)["egress_authz.verdict"] == verdict
        assert _attrs(span)["egress_authz.filter"] == "http"
        assert _attrs(span)["egress_authz.namespace"] == "shop"
    assert by_host["denied.example"].trace_state == "app=1"
    assert _attrs(by_host["denied.example"])["egress_authz.decision_id"] == denied_id

    url = f"{traced.admin_url}/v1/decisions/{denied_id}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        seen = json.load(resp)
    assert seen["trace_id"] == CLIENT_TRACE and seen["verdict"] == "deny"
