"""`serve` as shipped: what a caller can make it record, and its admin port at start."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.commands import serve
from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest
from authz.envoy.server import CHECK_METHOD
from authz.observe.bounded import DEFAULT_LIMITS
from authz.observe.decisionlog import LOG_LINE_MAX
from authz.testing.envoy import free_port
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, pod, policy_cm, rule, write_kubeconfig
from tests.test_server import PODS, policy_yaml

pytestmark = pytest.mark.timeout(60)

SECRET = "sk_live_51HxQdoors"
CART = "spiffe://cluster.local/ns/shop/sa/cart"


def http_check(host: str, path: str, sni: str | None = None) -> bytes:
    r = CheckRequest()
    a = r.attributes
    a.source.principal = CART
    a.source.address.socket_address.address = "127.0.0.2"
    a.destination.address.socket_address.port_value = 443
    if sni:
        a.tls_session.sni = sni
    a.request.http.host = host
    a.request.http.method = "GET"
    a.request.http.path = path
    return r.SerializeToString()


class Served:
    def __init__(self, grpc_port: int, admin_port: int, log: Path) -> None:
        self.log = log
        self.grpc_port = grpc_port
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        self.check = self.channel.unary_unary(CHECK_METHOD)

    def decisions(self, query: str = "") -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.admin}/v1/decisions?{query}", timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
            return body


def kube_args(tmp_path: Path) -> Iterator[list[str]]:
    """`--kube` flags against the API emulator, seeded with the shop policy and Pod."""
    with KubeEmulator(bookmark_interval=0.2) as emu:
        emu.seed(
            policy_cm("shop", "egress-policy", [rule("cart", "api.kadath.io")]),
            pod("shop", "cart-finance", "127.0.0.2", sa="cart"),
        )
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
        yield ["--kube", "--kubeconfig", str(kubeconfig), "--namespace", SVC_NS]


@pytest.fixture(params=["file", "kube"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Served]:
    """`serve` in a thread, in file mode (with a workload file) and in `--kube` mode
    on the API emulator; its stdout (the decision log) goes to a file."""
    log = (tmp_path / "decisions.log").open("w")
    monkeypatch.setattr(sys, "stdout", log)
    with contextlib.ExitStack() as stack:
        if request.param == "kube":
            source = stack.enter_context(contextlib.contextmanager(kube_args)(tmp_path))
        else:
            (tmp_path / "policies").mkdir()
            (tmp_path / "policies" / "shop.yaml").write_text(policy_yaml(["api.kadath.io"]))
            (tmp_path / "pods.yaml").write_text(PODS)
            source = ["--policies", str(tmp_path / "policies"),
                      "--workloads", str(tmp_path / "pods.yaml")]  # fmt: skip
        grpc_port, admin_port = free_port(), free_port()
        args = serve.build_arg_parser().parse_args([
            *source, "--grpc-address", f"127.0.0.1:{grpc_port}",
            "--admin-address", f"127.0.0.1:{admin_port}", "--shutdown-grace", "0.5",
            "--decision-buffer", "100",
        ])  # fmt: skip
        stop = threading.Event()
        t = threading.Thread(target=serve.serve, args=(args, stop), daemon=True)
        t.start()
        s = Served(grpc_port, admin_port, tmp_path / "decisions.log")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{s.admin}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        yield s
        s.channel.close()
        stop.set()
        t.join(10)
    log.close()


def wait_for(served: Served, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found: list[dict[str, Any]] = served.decisions()["decisions"]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} decisions recorded")


class TestRecordedThroughServe:
    def test_query_values_and_long_fields_never_recorded(self, served: Served) -> None:
        """Through the gRPC port: a query secret reaches neither the admin API nor the
        decision log, and a 16 KB Host and path are stored and logged capped."""
        served.check(http_check("api.kadath.io", f"/v1/report?api_key={SECRET}"), timeout=5)
        long_host = "h" * 16_000 + ".kadath.io"
        served.check(http_check(long_host, "/" + "p" * 16_000, sni=long_host), timeout=5)
        newest, first = wait_for(served, 2)[:2]
        assert first["path"] == "/v1/report?api_key"
        assert SECRET not in json.dumps(first)
        assert newest["reason"] == "invalid-host"
        assert len(newest["http_host"]) == DEFAULT_LIMITS.not_a_host
        assert len(newest["sni"]) == DEFAULT_LIMITS.not_a_host
        assert len(newest["path"]) == DEFAULT_LIMITS.path
        deadline = time.monotonic() + 5
        out = ""
        while out.count("\n") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            out = served.log.read_text()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert len(lines) == 2
        assert SECRET not in out
        assert all(len(line.encode()) <= LOG_LINE_MAX for line in lines)
        assert max(len(line) for line in lines) < 2_000


    def test_forged_flood_leaves_real_decisions(self, served: Served) -> None:
        """Through the gRPC port, 1,000 forged Checks (no Pod behind the address, a new
        namespace each) do not evict a real workload's decisions from a 100-decision
        buffer."""
        for _ in range(20):
            served.check(http_check("api.kadath.io", "/real"), timeout=5)
        for i in range(1_000):
            r = CheckRequest()
            r.attributes.source.principal = f"spiffe://cluster.local/ns/forged{i}/sa/x"
            r.attributes.source.address.socket_address.address = "10.66.6.6"
            r.attributes.destination.address.socket_address.port_value = 443
            r.attributes.tls_session.sni = "forged.example.com"
            served.check(r.SerializeToString(), timeout=5)
        body = served.decisions("host=api.kadath.io&limit=1000")
        assert body["count"] == 20 and body["buffered"] == 100


class TestAdminPortAtStart:
    def test_taken_admin_port_fails_start(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`serve` exits 1 at once, saying which address is taken and what to do, rather
        than serving Checks without probes or metrics."""
        (tmp_path / "shop.yaml").write_text(policy_yaml(["api.kadath.io"]))
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            args = serve.build_arg_parser().parse_args([
                "--policies", str(tmp_path), "--grpc-address", "127.0.0.1:0",
                "--admin-address", f"127.0.0.1:{port}",
            ])  # fmt: skip
            t0 = time.monotonic()
            assert serve.run(args) == 1
            assert time.monotonic() - t0 < 10
        err = capsys.readouterr().err
        assert f"cannot serve the admin endpoint on 127.0.0.1:{port}" in err
        assert "--admin-address" in err

    def test_taken_grpc_port_names_the_cause(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A taken Check port stops `serve` (exit 1) with the cause and the flag on one line
        of ours, not only in a gRPC C-core log line."""
        (tmp_path / "shop.yaml").write_text(policy_yaml(["api.kadath.io"]))
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            args = serve.build_arg_parser().parse_args([
                "--policies", str(tmp_path), "--grpc-address", f"127.0.0.1:{port}",
                "--admin-address", "",
            ])  # fmt: skip
            assert serve.run(args) == 1
        err = capsys.readouterr().err
        assert f"egress-authz serve: cannot listen for Check on 127.0.0.1:{port}: " in err
        assert "Address already in use" in err and "--grpc-address" in err
