"""One loopback mesh and one `egress-authz serve` per test session (per xdist worker).

The world the scenarios run in:

    namespace shop
      pod cart-finance    127.0.0.2  sa cart      function=finance
      pod cart-marketing  127.0.0.3  sa cart      function=marketing
      pod frontend        127.0.0.4  sa frontend

      ConfigMap egress-policy
        cart-kadath        sa cart                      api.kadath.io
        frontend-cdn       sa frontend                  cdn.kadath.io
        finance-payments   sa cart, function=finance    payments.kadath.io
      ConfigMap egress-reload (edited by the reload scenario, then restored)
        reloadable         sa cart                      reload.kadath.io, keep.kadath.io

Tests that stop the service or edit a policy put things back before they
end, so the fixtures can be shared; each says so where it does it.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from authz.testing.clients import HTTPResult, TLSResult
from authz.testing.envoy import free_port
from authz.testing.mesh import LoopbackMesh
from authz.testing.pods import Pod, pods_manifest
from authz.testing.service import ServiceProcess

CART_FINANCE = Pod(
    "cart-finance", "shop", "cart", "127.0.0.2", {"app": "cart", "function": "finance"}
)
CART_MARKETING = Pod(
    "cart-marketing", "shop", "cart", "127.0.0.3", {"app": "cart", "function": "marketing"}
)
FRONTEND = Pod("frontend", "shop", "frontend", "127.0.0.4", {"app": "frontend"})
PODS = (CART_FINANCE, CART_MARKETING, FRONTEND)


def policy_configmap(name: str, namespace: str, rules: str) -> str:
    """A policy ConfigMap; `rules` is the YAML list under `rules:`."""
    body = "mode: enforce\nrules:\n" + textwrap.indent(textwrap.dedent(rules).strip(), "  ")
    return f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    egress-authz.io/policy: "true"
data:
  policy.yaml: |
{textwrap.indent(body, "    ")}
"""


def ports_of(mesh_ports: tuple[int, int]) -> str:
    # The service takes the port from destination.address, i.e. the gateway
    # listener, which here is a random loopback port instead of 80/443.
    return "[" + ", ".join(str(p) for p in (80, 443, *mesh_ports)) + "]"


def shop_policy(ports: str) -> str:
    return policy_configmap(
        "egress-policy",
        "shop",
        f"""
        - name: cart-kadath
          workloads: {{serviceAccounts: [cart]}}
          hosts: [api.kadath.io]
          ports: {ports}
        - name: frontend-cdn
          workloads: {{serviceAccounts: [frontend]}}
          hosts: [cdn.kadath.io]
          ports: {ports}
        - name: finance-payments
          workloads:
            serviceAccounts: [cart]
            matchLabels: {{function: finance}}
          hosts: [payments.kadath.io]
          ports: {ports}
        """,
    )


def reload_policy(ports: str, hosts: tuple[str, ...]) -> str:
    return policy_configmap(
        "egress-reload",
        "shop",
        f"""
        - name: reloadable
          workloads: {{serviceAccounts: [cart]}}
          hosts: [{", ".join(hosts)}]
          ports: {ports}
        """,
    )


RELOAD_HOSTS = ("reload.kadath.io", "keep.kadath.io")


@dataclass
class World:
    mesh: LoopbackMesh
    service: ServiceProcess
    policies: Path
    ports: str

    @property
    def reload_file(self) -> Path:
        return self.policies / "shop-reload.yaml"

    def write_reload_policy(self, hosts: tuple[str, ...]) -> None:
        self.reload_file.write_text(reload_policy(self.ports, hosts))

    def http(self, pod: Pod, host: str, **kw: Any) -> HTTPResult:
        return self.mesh.http(
            host,
            namespace=pod.namespace,
            service_account=pod.service_account,
            source_ip=pod.ip,
            **kw,
        )

    def tls(self, pod: Pod, host: str, **kw: Any) -> TLSResult:
        return self.mesh.tls(
            host, namespace=pod.namespace, service_account=pod.service_account, pod_ip=pod.ip, **kw
        )


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("e2e")
    authz_port = free_port()
    policies = root / "policies"
    policies.mkdir()
    workloads = root / "pods.yaml"
    workloads.write_text(pods_manifest(PODS))
    service = ServiceProcess(
        policies,
        authz_port,
        workloads=workloads,
        admin_port=free_port(),
        log_path=root / "service.log",
    )
    with LoopbackMesh(authz_port, workdir=root / "mesh") as mesh:
        # The listener ports are final once the gateway runs.
        ports = ports_of((mesh.http_port, mesh.tls_port))
        (policies / "shop.yaml").write_text(shop_policy(ports))
        (policies / "shop-reload.yaml").write_text(reload_policy(ports, RELOAD_HOSTS))
        service.start()  # a missing or broken service fails here, loudly
        try:
            yield World(mesh=mesh, service=service, policies=policies, ports=ports)
        finally:
            service.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach what the service and the gateway said: the first
    thing anyone debugging an end-to-end failure asks for."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    world = getattr(item, "funcargs", {}).get("world")
    if report.failed and isinstance(world, World):
        report.sections.append(("egress-authz serve (stderr tail)", world.service.output_tail()))
        report.sections.append(("gateway Envoy (log tail)", world.mesh.gateway.log_tail()))
        access = world.mesh.access_log
        if access.exists():
            tail = "\n".join(access.read_text().splitlines()[-20:])
            report.sections.append(("gateway access log (tail)", tail))


def eventually(
    probe: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = "condition"
) -> float:
    """Poll until `probe()` is true; returns the seconds it took."""
    start = time.monotonic()
    while True:
        if probe():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)
