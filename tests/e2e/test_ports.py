"""The port judged, through the real gateway Envoy 1.40 (issues 10.4 and 11.2).

The gateway here is an unprivileged one: its listeners are not on 443/80 but
on other ports (random loopback ports, standing in for istio-egress's 8443 and
8080: fixed ports would collide with concurrent runs, as Envoy binds with
SO_REUSEPORT). `serve --gateway-port-map TLS_LISTENER:443,HTTP_LISTENER:80`
tells the service which Service port each listener is, so rules say 443 and
80 only, as users write them. Verdicts are judged by what the client and the
loopback upstream saw.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.testing.envoy import free_port
from authz.testing.mesh import LoopbackMesh
from authz.testing.pods import pods_manifest
from authz.testing.policies import policy_configmap
from authz.testing.service import ServiceProcess

from .conftest import CART_FINANCE, eventually, plain_get

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]

POLICY = policy_configmap(
    "egress-ports",
    "shop",
    """
    - name: api-tls
      workloads: {serviceAccounts: [cart]}
      hosts: [api.kadath.io]
      ports: [443]
    - name: web-http
      workloads: {serviceAccounts: [cart]}
      hosts: [web.kadath.io]
      ports: [80]
    - name: alt-8443
      workloads: {serviceAccounts: [cart]}
      hosts: [alt.kadath.io]
      ports: [8443]
    """,
)


@dataclass
class PortsWorld:
    mesh: LoopbackMesh
    service: ServiceProcess

    @property
    def port_map(self) -> str:
        return f"{self.mesh.tls_port}:443,{self.mesh.http_port}:80"

    def restart_with(self, *extra: str) -> None:
        self.service.stop()
        self.service.extra_args = ["--no-decision-log", *extra]
        self.service.start()


@pytest.fixture(scope="module")
def ports_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PortsWorld]:
    root = tmp_path_factory.mktemp("ports")
    policies = root / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(POLICY)
    workloads = root / "pods.yaml"
    workloads.write_text(pods_manifest([CART_FINANCE]))
    authz_port = free_port()
    service = ServiceProcess(policies, authz_port, workloads=workloads,
                             log_path=root / "service.log")
    with LoopbackMesh(authz_port, workdir=root / "mesh") as mesh:
        world = PortsWorld(mesh, service)
        # The listener ports are final once the gateway runs.
        assert 443 not in (mesh.tls_port, mesh.http_port)
        service.extra_args = ["--no-decision-log", "--gateway-port-map", world.port_map]
        service.start()
        try:
            yield world
        finally:
            service.stop()


def http_(world: PortsWorld, host: str) -> tuple[int, dict[str, object]]:
    result = world.mesh.http(host, namespace="shop", service_account="cart",
                             source_ip=CART_FINANCE.ip)
    body = json.loads(result.body) if result.status == 403 and result.body else {}
    return result.status, body


def tls_reply(world: PortsWorld, host: str) -> bytes | None:
    return world.mesh.tls(host, namespace="shop", service_account="cart",
                          pod_ip=CART_FINANCE.ip).reply


class TestListenerPortIsTranslated:
    """Issue 11.2: the listener port is translated back to the Service port."""

    def test_tls_rule_for_443_allows_through_the_8443_style_listener(
            self, ports_world: PortsWorld) -> None:
        """The app's TLS to api.kadath.io (rule: 443) arrives through a gateway whose
        TLS listener is not 443."""
        assert tls_reply(ports_world, "api.kadath.io") == b"hello api.kadath.io: ping\n"

    def test_rule_for_another_port_does_not_match_the_443_listener(
            self, ports_world: PortsWorld) -> None:
        """A rule for 8443 does not open the gateway's 443 path (nor does the listener
        port, whatever it is, count as 8443)."""
        before = ports_world.mesh.tls_upstream.accepts
        assert tls_reply(ports_world, "alt.kadath.io") is None
        time.sleep(0.2)  # an accept racing the close would show up by now
        assert ports_world.mesh.tls_upstream.accepts == before

    def test_http_rule_for_80_allows_through_the_8080_style_listener(
            self, ports_world: PortsWorld) -> None:
        """HTTP for web.kadath.io (rule: 80), with and without the default port in Host."""
        assert http_(ports_world, "web.kadath.io")[0] == 200
        assert http_(ports_world, "web.kadath.io:80")[0] == 200

    def test_without_the_map_and_with_a_partial_map(self, ports_world: PortsWorld) -> None:
        """Without the map (the old behaviour) the 443 rule denies the TLS connection; with
        a map lacking the HTTP listener, HTTP is denied and the reason names that listener.
        Restarts the module's service and always restores the full map."""
        try:
            ports_world.restart_with()
            assert tls_reply(ports_world, "api.kadath.io") is None
            status, body = http_(ports_world, "web.kadath.io")
            assert (status, body["reason"]) == (403, "port-not-allowed")
            ports_world.restart_with("--gateway-port-map", f"{ports_world.mesh.tls_port}:443")
            status, body = http_(ports_world, "web.kadath.io")
            assert (status, body["reason"]) == (403, "port-not-allowed")
            assert f"gateway listener port {ports_world.mesh.http_port}" in str(body["message"])
            assert tls_reply(ports_world, "api.kadath.io") == b"hello api.kadath.io: ping\n"
        finally:
            ports_world.restart_with("--gateway-port-map", ports_world.port_map)
        eventually(lambda: http_(ports_world, "web.kadath.io")[0] == 200, timeout=10,
                   what="the full map in force again")


class TestHostPortCannotChooseThePort:
    """Issue 10.4: on the plain-HTTP listener, a Host port is not the port judged."""

    def test_host_443_over_cleartext_is_port_mismatch(self, ports_world: PortsWorld) -> None:
        """The attack: `Host: api.kadath.io:443` over the HTTP listener (port 80 after the
        map), where api.kadath.io is allowed on 443 only: 403 port-mismatch, upstream
        untouched. (Before the fix: 200, the cleartext request reached the upstream.)"""
        before = ports_world.mesh.http_upstream.accepts
        status, body = http_(ports_world, "api.kadath.io:443")
        assert (status, body["reason"]) == (403, "port-mismatch")
        assert "port 443" in str(body["message"]) and "port 80" in str(body["message"])
        status, body = http_(ports_world, "api.kadath.io")
        assert (status, body["reason"]) == (403, "port-not-allowed")
        assert ports_world.mesh.http_upstream.accepts == before

    def test_host_port_through_the_http_sidecar(self, ports_world: PortsWorld) -> None:
        """The same through the mesh's own HTTP path (app -> sidecar -> gateway)."""
        sidecar = ports_world.mesh.sidecar("shop", "cart", CART_FINANCE.ip, kind="http")
        port = ports_world.mesh.listen_port(sidecar)
        status, body = plain_get(port, "api.kadath.io:443")
        assert status == 403 and json.loads(body)["reason"] == "port-mismatch"
        assert plain_get(port, "web.kadath.io")[0] == 200


class KubeServiceProcess(ServiceProcess):
    """`serve --kube` (the chart's mode) against the API emulator, same lifecycle."""

    def __init__(self, kubeconfig: Path, port: int, **kw: Any) -> None:
        super().__init__(kubeconfig.parent, port, **kw)
        self.kubeconfig = kubeconfig

    def command(self) -> list[str]:
        return [sys.executable, "-m", "authz", "serve", "--kube",
                "--kubeconfig", str(self.kubeconfig), "--namespace", "egress-authz",
                "--gateway-namespace", GATEWAY_NS, "--gateway-service", "istio-egressgateway",
                "--no-write", "--no-decision-log", "--grpc-address", self.address,
                "--admin-address", ""]


GATEWAY_NS = "istio-egress"


def gateway_service(tls_target: int, http_target: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "istio-egressgateway", "namespace": GATEWAY_NS},
            "spec": {"ports": [
                {"name": "http2", "port": 80, "targetPort": http_target, "protocol": "TCP"},
                {"name": "https", "port": 443, "targetPort": tls_target, "protocol": "TCP"}]}}


class TestKubeMode:
    """The shipped configuration: the map learnt from the gateway Service, behind Envoy."""

    def test_service_edits_move_the_verdicts(self, tmp_path: Path) -> None:
        """Service 443 -> the TLS listener: the 443 rule allows through Envoy; the Service
        edited to point 443 elsewhere: the same connection is refused; restored: allowed."""
        from tests.kube_emulator import KubeEmulator
        from tests.kube_harness import write_kubeconfig

        with KubeEmulator(bookmark_interval=0.2) as emu:
            kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
            emu.seed(yaml.safe_load(POLICY), {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": CART_FINANCE.name, "namespace": "shop",
                             "labels": dict(CART_FINANCE.labels)},
                "spec": {"serviceAccountName": "cart", "containers": [{"name": "app"}]},
                "status": {"phase": "Running", "podIP": CART_FINANCE.ip,
                           "podIPs": [{"ip": CART_FINANCE.ip}]}})
            authz_port = free_port()
            service = KubeServiceProcess(kubeconfig, authz_port,
                                         log_path=tmp_path / "service.log")
            with LoopbackMesh(authz_port, workdir=tmp_path / "mesh") as mesh:
                emu.seed(gateway_service(mesh.tls_port, mesh.http_port))
                world = PortsWorld(mesh, service)
                with service:
                    eventually(lambda: tls_reply(world, "api.kadath.io") is not None,
                               timeout=15, what="443 rule allowed via the Service's map")
                    assert http_(world, "web.kadath.io")[0] == 200
                    status, body = http_(world, "api.kadath.io:443")
                    assert (status, body["reason"]) == (403, "port-mismatch")

                    def point_443_at(target: int) -> None:
                        def change(obj: dict[str, Any]) -> None:
                            obj["spec"]["ports"][1]["targetPort"] = target
                        emu.modify("v1", "Service", GATEWAY_NS, "istio-egressgateway", change)

                    point_443_at(mesh.tls_port + 1)
                    eventually(lambda: tls_reply(world, "api.kadath.io") is None, timeout=5,
                               what="denied once the Service moved 443 elsewhere")
                    point_443_at(mesh.tls_port)
                    eventually(lambda: tls_reply(world, "api.kadath.io") is not None,
                               timeout=5, what="allowed again after the Service was restored")
