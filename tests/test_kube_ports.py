"""`serve --kube` learns the gateway port map from the gateway Service, live.

The Service (port -> targetPort) is watched in the gateway namespace; editing it
changes the verdicts without a restart, and a missing Service denies (fail closed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckResponse
from authz.envoy.server import CHECK_METHOD
from authz.gateway_ports import GatewayPorts
from authz.kube.gateway_service import GatewayServiceWatch
from authz.testing.envoy import free_port
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, Replica, emu, pod, policy_cm, replica, rule, write_kubeconfig
from tests.test_ports import check_request

__all__ = ["emu", "replica"]  # fixtures
pytestmark = pytest.mark.kube

GATEWAY_NS = "istio-egress"
SVC = ("v1", "Service", GATEWAY_NS, "istio-egressgateway")


def gateway_service(https_target: int | str = 8443, name: str = "istio-egressgateway",
                    ) -> dict[str, Any]:
    """istioctl's unprivileged egress gateway: 80 -> 8080, 443 -> 8443."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": GATEWAY_NS},
            "spec": {"selector": {"istio": "egressgateway"}, "ports": [
                {"name": "http2", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "https", "port": 443, "targetPort": https_target, "protocol": "TCP"},
            ]}}


def set_https_target(target: int) -> Any:
    def change(obj: dict[str, Any]) -> None:
        obj["spec"]["ports"][1]["targetPort"] = target
    return change


@pytest.fixture
def watch(replica: Replica) -> Iterator[tuple[GatewayServiceWatch, GatewayPorts]]:
    ports = GatewayPorts({})
    w = GatewayServiceWatch(replica.api(), ports, namespace=GATEWAY_NS)
    w.start()
    yield w, ports
    w.stop()


class TestServiceWatch:
    def test_map_follows_the_service(self, emu: KubeEmulator,
                                     watch: tuple[GatewayServiceWatch, GatewayPorts]) -> None:
        """Absent: empty (deny). Created, edited, deleted: the map follows each change."""
        w, ports = watch
        emu.wait_for(w.reflector.synced.is_set, timeout=3)
        assert ports.current == {} and ports.translate(8443) == 0
        assert "not found" in w.problems[0]
        emu.seed(gateway_service())
        emu.wait_for(lambda: ports.translate(8443) == 443, timeout=2)
        assert dict(ports.current or {}) == {8080: 80, 8443: 443}
        emu.modify(*SVC, set_https_target(9443))
        emu.wait_for(lambda: ports.translate(9443) == 443, timeout=2)
        assert ports.translate(8443) == 0  # the old listener port no longer counts
        emu.remove(*SVC)
        emu.wait_for(lambda: ports.current == {}, timeout=2)

    def test_other_services_do_not_count(self, emu: KubeEmulator,
                                         watch: tuple[GatewayServiceWatch, GatewayPorts]) -> None:
        """A Service of another name, or of the same name in another namespace, is ignored."""
        _, ports = watch
        decoy = gateway_service(7443, name="decoy")
        elsewhere = gateway_service(6443)
        elsewhere["metadata"]["namespace"] = "shop"
        emu.seed(decoy, elsewhere, gateway_service())
        emu.wait_for(lambda: ports.translate(8443) == 443, timeout=2)
        assert ports.translate(7443) == ports.translate(6443) == 0

    def test_named_target_port_is_reported(self, emu: KubeEmulator,
                                           watch: tuple[GatewayServiceWatch, GatewayPorts]
                                           ) -> None:
        """A named targetPort stays unmapped (denied), and the watch says why."""
        w, ports = watch
        emu.seed(gateway_service("https"))
        emu.wait_for(lambda: ports.translate(8080) == 80, timeout=2)
        assert ports.translate(8443) == 0
        assert any("named targetPort 'https'" in p for p in w.problems)

    def test_reads_only_the_gateway_namespace(self, emu: KubeEmulator,
                                              watch: tuple[GatewayServiceWatch, GatewayPorts]
                                              ) -> None:
        """Every Service request names the gateway namespace (what the chart's Role grants)."""
        w, _ = watch
        emu.wait_for(w.reflector.synced.is_set, timeout=3)
        emu.seed(gateway_service())
        emu.wait_for(lambda: any("watch" in r.query for r in emu.requests
                                 if "/services" in r.path), timeout=3)
        paths = {r.path for r in emu.requests if "/services" in r.path}
        assert paths == {f"/api/v1/namespaces/{GATEWAY_NS}/services"}


class TestServeKube:
    """The shipped command line (`serve --kube`, the chart's flags) against the emulator."""

    def test_verdicts_follow_the_gateway_service(self, emu: KubeEmulator,
                                                 tmp_path: Path) -> None:
        """A 443 rule allows Checks from listener 8443 once the Service says 443 -> 8443;
        the Service edited to 443 -> 9443 moves the allow to 9443, with no restart."""
        from authz.commands.serve import build_arg_parser, serve

        emu.seed(policy_cm("shop", "p", [rule("kadath", "api.kadath.io", ports=[443])]),
                 gateway_service(),
                 pod("shop", "cart", "10.0.0.9", sa="cart"))  # the caller: no Pod, no allow
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
        port = free_port()
        args = build_arg_parser().parse_args([
            "--kube", "--kubeconfig", str(kubeconfig), "--namespace", SVC_NS,
            "--gateway-namespace", GATEWAY_NS, "--gateway-service", "istio-egressgateway",
            "--no-write", "--grpc-address", f"127.0.0.1:{port}", "--admin-address", "",
            "--no-decision-log"])
        stop = threading.Event()
        t = threading.Thread(target=serve, args=(args, stop), daemon=True)
        t.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        check = channel.unary_unary(CHECK_METHOD)

        def code(listener: int) -> int:
            try:
                resp = CheckResponse()
                resp.ParseFromString(check(check_request(listener), timeout=2))
                return resp.status.code
            except grpc.RpcError:
                return -1  # not serving yet

        try:
            emu.wait_for(lambda: code(8443) == 0, timeout=10)
            assert code(443) == 7  # the Service's port is not a listener port
            emu.modify(*SVC, set_https_target(9443))
            emu.wait_for(lambda: code(9443) == 0, timeout=3)
            assert code(8443) == 7
            emu.remove(*SVC)
            emu.wait_for(lambda: code(9443) == 7, timeout=3)
        finally:
            channel.close()
            stop.set()
            t.join(10)


class TestControllerOrder:
    def test_map_is_read_before_policies(self, emu: KubeEmulator) -> None:
        """KubeController.start reads the gateway Service before the policy source starts,
        so the service is never ready (policy loaded) with an empty map."""
        from authz.kube.client import KubeApi
        from authz.kube.controller import KubeController
        from authz.kube.source import KubeSettings
        from authz.render import RenderOptions
        from authz.store import PolicyStore
        from authz.workloads import WorkloadIndex

        class SlowServices(KubeApi):
            """An API server slow to list Services only: 0.3 s of simulated latency."""

            def list(self, kind: str, **kw: Any) -> tuple[list[dict[str, Any]], str]:
                if kind == "Service":
                    time.sleep(0.3)
                return super().list(kind, **kw)

        emu.seed(gateway_service(), policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        ports = GatewayPorts({})
        seen: list[dict[int, int]] = []
        store = PolicyStore(freeze_gc=False)
        store.subscribe(lambda _snapshot: seen.append(dict(ports.current or {})))
        controller = KubeController(
            SlowServices(emu.api_client(), service_ns=SVC_NS), WorkloadIndex(),
            settings=KubeSettings(service_namespace=SVC_NS), write=False,
            options=RenderOptions(gateway_namespace=GATEWAY_NS), ports=ports,
            gateway_service="istio-egressgateway")
        controller.start(store, lambda _msg: None)
        try:
            emu.wait_for(lambda: seen, timeout=5)
            assert seen[0] == {8080: 80, 8443: 443}
        finally:
            controller.stop()
