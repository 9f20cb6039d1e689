"""One loopback mesh and one `egress-authz serve` per policy source, per session
(per xdist worker): every scenario that takes `world` runs once against each.

    file   `serve --policies DIR --workloads pods.yaml --gateway-port-map ...`:
           one file per ConfigMap
    kube   `serve --kube` on the API emulator (tests/kube_emulator.py) through the
           official client, as the chart runs it: ConfigMap, Pod and gateway
           Service watches, the cluster tier, the registry writer and the Lease

The gateway listens on random loopback ports; the port map (the flag, or the
gateway Service's targetPorts) turns them back into 443 and 80, the ports the
rules name.

Both worlds are built from the same objects (the manifests below), and change
them the same way (World.put_policy, World.put_pod, ...), so a scenario is
written once and judged against the configuration we ship as well as the
local one.

    namespace shop
      pod cart-finance    127.0.0.2  sa cart      function=finance
      pod cart-marketing  127.0.0.3  sa cart      function=marketing
      pod frontend        127.0.0.4  sa frontend

      ConfigMap egress-policy
        cart-kadath        sa cart                      api.kadath.io, blocked.kadath.io
        frontend-cdn       sa frontend                  cdn.kadath.io
        finance-payments   sa cart, function=finance    payments.kadath.io
      ConfigMap egress-reload (edited by the reload scenarios, then restored)
        reloadable         sa cart                      reload.kadath.io, keep.kadath.io

    namespace egress-authz (the service's)
      ConfigMap egress-cluster-policy   tier cluster   deny blocked.kadath.io

127.0.0.5 to 127.0.0.9 belong to no Pod; scenarios that add Pods use them
and remove them again. Tests that stop the service or edit a policy put things
back before they end, so the fixtures can be shared; each says so where it
does it.
"""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from authz.testing.clients import HTTPResult, TLSResult
from authz.testing.envoy import free_port
from authz.testing.mesh import LoopbackMesh
from authz.testing.pods import Pod, pod_object, pods_manifest
from authz.testing.policies import policy_configmap
from authz.testing.service import ServiceProcess
from tests.kube_emulator import KubeEmulator

SERVICE_NAMESPACE = "egress-authz"  # serve's default --cluster-namespace / --namespace

CART_FINANCE = Pod(
    "cart-finance", "shop", "cart", "127.0.0.2", {"app": "cart", "function": "finance"}
)
CART_MARKETING = Pod(
    "cart-marketing", "shop", "cart", "127.0.0.3", {"app": "cart", "function": "marketing"}
)
FRONTEND = Pod("frontend", "shop", "frontend", "127.0.0.4", {"app": "frontend"})
PODS = (CART_FINANCE, CART_MARKETING, FRONTEND)


def ports_of(mesh_ports: tuple[int, int]) -> str:
    # Without a gateway port map the service judges destination.address, i.e.
    # the gateway listener, which here is a random loopback port, not 80/443.
    return "[" + ", ".join(str(p) for p in (80, 443, *mesh_ports)) + "]"


# With the gateway port map (the world's), rules name the ports apps dial.
MAPPED_PORTS = "[80, 443]"
GATEWAY_NAMESPACE = "istio-egress"  # serve's --gateway-namespace default
GATEWAY_SERVICE = "istio-egressgateway"  # serve's --gateway-service default


def gateway_service(mesh: LoopbackMesh) -> dict[str, Any]:
    """The egress gateway's Service as an unprivileged install has it: Service ports
    443/80 in front of the gateway's listener ports (targetPort)."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": GATEWAY_SERVICE, "namespace": GATEWAY_NAMESPACE},
            "spec": {"selector": {"istio": "egressgateway"}, "ports": [
                {"name": "http2", "port": 80, "targetPort": mesh.http_port, "protocol": "TCP"},
                {"name": "https", "port": 443, "targetPort": mesh.tls_port, "protocol": "TCP"},
            ]}}


def shop_policy(ports: str) -> str:
    return policy_configmap(
        "egress-policy",
        "shop",
        f"""
        - name: cart-kadath
          workloads: {{serviceAccounts: [cart]}}
          hosts: [api.kadath.io, blocked.kadath.io]
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
CLUSTER_DENIED_HOST = "blocked.kadath.io"


def cluster_policy(deny: tuple[str, ...]) -> str:
    """The cluster tier: a ConfigMap in the service's namespace labelled tier=cluster."""
    return f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: egress-cluster-policy
  namespace: {SERVICE_NAMESPACE}
  labels:
    egress-authz.io/tier: cluster
data:
  policy.yaml: |
    deny: [{", ".join(deny)}]
    rules: []
"""


class Backend(Protocol):
    """Where the world's ConfigMaps and Pods live, and how `serve` reads them."""

    mode: str

    def service(self, authz_port: int, admin_port: int, log_path: Path,
                mesh: LoopbackMesh) -> ServiceProcess: ...
    def put_policy(self, manifest: str) -> None: ...
    def delete_policy(self, namespace: str, name: str) -> None: ...
    def put_pod(self, pod: Pod) -> None: ...
    def delete_pod(self, pod: Pod) -> None: ...
    def close(self) -> None: ...


def _write_atomically(path: Path, text: str) -> None:
    # Written aside and renamed into place: the service never reads half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FileBackend:
    """`serve --policies DIR --workloads pods.yaml`, one file per ConfigMap."""

    mode = "file"

    def __init__(self, root: Path) -> None:
        self.policies = root / "policies"
        self.policies.mkdir()
        self.workloads = root / "pods.yaml"
        self._pods: dict[tuple[str, str], Pod] = {}
        self._write_pods()

    def service(self, authz_port: int, admin_port: int, log_path: Path,
                mesh: LoopbackMesh) -> ServiceProcess:
        port_map = f"{mesh.tls_port}:443,{mesh.http_port}:80"
        return ServiceProcess(
            self.policies, authz_port, workloads=self.workloads, admin_port=admin_port,
            log_path=log_path, extra_args=["--gateway-port-map", port_map],
        )

    def _file(self, namespace: str, name: str) -> Path:
        return self.policies / f"{namespace}-{name}.yaml"

    def put_policy(self, manifest: str) -> None:
        meta = yaml.safe_load(manifest)["metadata"]
        _write_atomically(self._file(meta["namespace"], meta["name"]), manifest)

    def delete_policy(self, namespace: str, name: str) -> None:
        self._file(namespace, name).unlink()

    def put_pod(self, pod: Pod) -> None:
        self._pods[(pod.namespace, pod.name)] = pod
        self._write_pods()

    def delete_pod(self, pod: Pod) -> None:
        del self._pods[(pod.namespace, pod.name)]
        self._write_pods()

    def _write_pods(self) -> None:
        _write_atomically(self.workloads, pods_manifest(self._pods.values()))

    def close(self) -> None:
        pass


class KubeBackend:
    """`serve --kube` against the API emulator: what the chart runs, watches and all."""

    mode = "kube"

    def __init__(self, root: Path) -> None:
        self.emu = KubeEmulator().start()
        self.kubeconfig = root / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.emu.url}}],
            "contexts": [{"name": "emulator",
                          "context": {"cluster": "emulator", "user": "egress-authz"}}],
            "users": [{"name": "egress-authz", "user": {"token": "test"}}],
        }))

    def service(self, authz_port: int, admin_port: int, log_path: Path,
                mesh: LoopbackMesh) -> ServiceProcess:
        self.emu.seed(gateway_service(mesh))  # the port map, learnt by watch
        return ServiceProcess(
            None, authz_port, admin_port=admin_port, log_path=log_path,
            # As the chart runs it: admin endpoint in a supervising process.
            extra_args=["--kube", "--kubeconfig", str(self.kubeconfig),
                        "--namespace", SERVICE_NAMESPACE, "--separate-admin"],
        )

    def put_policy(self, manifest: str) -> None:
        self.emu.seed(yaml.safe_load(manifest))

    def delete_policy(self, namespace: str, name: str) -> None:
        self.emu.remove("v1", "ConfigMap", namespace, name)

    def put_pod(self, pod: Pod) -> None:
        self.emu.seed(pod_object(pod))

    def delete_pod(self, pod: Pod) -> None:
        self.emu.remove("v1", "Pod", pod.namespace, pod.name)

    def close(self) -> None:
        self.emu.stop()


BACKENDS: dict[str, Callable[[Path], Backend]] = {"file": FileBackend, "kube": KubeBackend}


@dataclass
class World:
    mesh: LoopbackMesh
    service: ServiceProcess
    backend: Backend
    ports: str

    @property
    def mode(self) -> str:
        return self.backend.mode

    def put_policy(self, manifest: str) -> None:
        """Create or replace a ConfigMap (a policy or the cluster tier)."""
        self.backend.put_policy(manifest)

    def delete_policy(self, namespace: str, name: str) -> None:
        self.backend.delete_policy(namespace, name)

    def put_pod(self, pod: Pod) -> None:
        """Create or replace a Pod (Running)."""
        self.backend.put_pod(pod)

    def delete_pod(self, pod: Pod) -> None:
        self.backend.delete_pod(pod)

    def write_reload_policy(self, hosts: tuple[str, ...]) -> None:
        self.put_policy(reload_policy(self.ports, hosts))

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


@pytest.fixture(scope="session", params=sorted(BACKENDS))
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    """The world of the module docstring, fed by one policy source (`world.mode`)."""
    root = tmp_path_factory.mktemp(f"e2e-{request.param}")
    authz_port = free_port()
    backend = BACKENDS[request.param](root)
    try:
        for pod in PODS:
            backend.put_pod(pod)
        with LoopbackMesh(authz_port, workdir=root / "mesh") as mesh:
            # The listener ports are final once the gateway runs.
            service = backend.service(authz_port, free_port(), root / "service.log", mesh)
            ports = MAPPED_PORTS
            backend.put_policy(shop_policy(ports))
            backend.put_policy(reload_policy(ports, RELOAD_HOSTS))
            backend.put_policy(cluster_policy((CLUSTER_DENIED_HOST,)))
            service.start()  # a missing or broken service fails here, loudly
            try:
                world = World(mesh=mesh, service=service, backend=backend, ports=ports)
                # Serving starts before a Kubernetes source has listed everything.
                eventually(
                    lambda: world.http(CART_FINANCE, "api.kadath.io").status == 200,
                    timeout=20,
                    what=f"the {request.param} world's policies in force",
                )
                yield world
            finally:
                service.stop()
    finally:
        backend.close()


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
        if isinstance(world.backend, KubeBackend):
            seen = [f"{r.method} {r.path} {r.status}" for r in world.backend.emu.requests[-20:]]
            report.sections.append(("API emulator requests (tail)", "\n".join(seen)))


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


def plain_get(port: int, host: str, path: str = "/") -> tuple[int, bytes]:
    """An app's plain-HTTP GET to its sidecar at 127.0.0.1:`port`: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
