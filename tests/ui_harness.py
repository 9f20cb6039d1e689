"""For the decision viewer's tests: a real `egress-authz serve` process on
127.0.0.1 fed with Checks over gRPC (as Envoy sends them), a cuttable TCP proxy
in front of its admin port, and Debian's Chromium driven by Playwright.

Chromium comes from Debian's `chromium` package (the Makefile installs it
when it runs as root); Playwright's own browser download is not reachable.
Without it the browser tests skip saying so, except under CI=true, where
they fail: CI must run them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckResponse
from authz.envoy.server import CHECK_METHOD
from tests.test_traces_cli import ANALYTICS, CART, check_request, free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ENV = "EGRESS_AUTHZ_CHROMIUM"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The machine is shared and loaded: generous, bounded waits on conditions.
WAIT_MS = 30_000

PODS = """\
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata: {name: cart-7d9f, namespace: shop, labels: {app: cart, function: api-connector}}
    spec: {serviceAccountName: cart}
    status: {phase: Running, podIP: 127.0.0.2}
  - apiVersion: v1
    kind: Pod
    metadata: {name: analytics-1, namespace: marketing, labels: {app: analytics}}
    spec: {serviceAccountName: analytics}
    status: {phase: Running, podIP: 127.0.0.3}
"""
@dataclass
class Service:
    """`egress-authz serve` in its own process."""

    admin_url: str
    policies: Path
    process: subprocess.Popen[bytes]
    channel: grpc.Channel

    def check(self, **kw: Any) -> str:
        """Send one Check; return the decision id Envoy would be given, once the
        admin endpoint has the decision (recorded in batches, within ~50 ms)."""
        raw = self.channel.unary_unary(CHECK_METHOD)(check_request(**kw), timeout=10)
        fields = CheckResponse.FromString(raw).dynamic_metadata.fields
        decision_id = str(fields["decision_id"].string_value)
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(
                    f"{self.admin_url}/v1/decisions/{decision_id}", timeout=5
                ):
                    return decision_id
            except urllib.error.HTTPError as e:
                if e.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.01)


@contextlib.contextmanager
def running_serve(tmp: Path) -> Iterator[Service]:
    policies = tmp / "policies"
    shutil.copytree(ROOT / "examples", policies)
    (tmp / "pods.yaml").write_text(PODS)
    grpc_port, admin_port = free_port(), free_port()
    log = (tmp / "serve.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "authz", "serve",
            "--policies", str(policies),
            "--workloads", str(tmp / "pods.yaml"),
            "--grpc-address", f"127.0.0.1:{grpc_port}",
            "--admin-address", f"127.0.0.1:{admin_port}",
            "--no-decision-log",
        ],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{admin_port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert process.poll() is None, (tmp / "serve.log").read_text()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(url + "/readyz", timeout=2) as resp,
            ):
                if resp.status == 200:
                    break
            assert time.monotonic() < deadline, "serve did not become ready in 60 s"
            time.sleep(0.1)  # polling a process we cannot get an event from
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        yield Service(url, policies, process, channel)
        channel.close()
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One running serve for a test module (a fixture: import it with `traffic`)."""
    with running_serve(tmp_path_factory.mktemp("ui")) as svc:
        yield svc


@pytest.fixture(scope="module")
def traffic(service: Service) -> dict[str, str]:
    """One of each: allow, host denial, port denial, cluster deny, audit (HTTP)."""
    return {
        "allow": service.check(sni="api.kadath.io", **CART),
        "deny": service.check(sni="api.leng.com", **CART),
        "port": service.check(sni="api.kadath.io", port=8443, **CART),
        "cluster": service.check(sni="api.stealyourmoney.com", **CART),
        "audit": service.check(host="hooks.kadath.io", port=80, path="/v2/x", **ANALYTICS),
    }


@dataclass
class CuttableProxy:
    """127.0.0.1:port -> target, whose connections a test can cut and restore:
    a network interruption between the browser and the admin endpoint."""

    target: tuple[str, int]
    port: int = field(default_factory=free_port)
    _listener: socket.socket | None = None
    _conns: set[socket.socket] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Close the listener and every open connection: new ones are refused."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def chromium_path() -> str | None:
    """Debian's Chromium, or the one $EGRESS_AUTHZ_CHROMIUM names."""
    for candidate in (os.environ.get(CHROMIUM_ENV), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def need_browser() -> str:
    """The Chromium to drive, or skip (fail under CI) saying what is missing."""
    why = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        why = "the `playwright` package is not installed (make venv installs it)"
    path = chromium_path()
    if why is None and path is None:
        why = (
            "no Chromium: install Debian's `chromium` package (the Makefile does when run "
            f"as root) or set {CHROMIUM_ENV} to a Chromium binary"
        )
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests must run in CI: {why}")
        pytest.skip(f"browser tests skipped: {why}")
    assert path is not None
    return path
