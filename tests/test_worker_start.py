"""A `--workers` worker listens only once its policy is in force.

Workers share the gRPC port with SO_REUSEPORT: the kernel spreads new
connections over every socket listening on it. A worker that listened before
its first policy load (as one restarted by the supervisor did) took its share
of the gateway's connections and denied them all with `no-policy`.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from authz.commands.serve import build_arg_parser, serve
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, pod, policy_cm, rule, write_kubeconfig
from tests.test_server import CART, Client, check_request, free_port


@pytest.fixture
def api() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as e:
        yield e


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def read_ready(fd: int, timeout: float) -> str:
    readable, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 64).decode() if readable else ""


class TestWorkerStart:
    def test_worker_listens_only_after_its_policy_loaded(
        self, api: KubeEmulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """While the API server is unreachable a worker keeps the port closed and reports
        nothing; once the policy loads it listens, reports its revision and allows."""
        api.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]),
                 pod("shop", "cart", "10.0.0.1", sa="cart"))
        config = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        api.stop()  # the worker starts during an API outage (or a slow first list)
        port = free_port()
        ready_r, ready_w = os.pipe()
        args = build_arg_parser().parse_args([
            "--kube", "--kubeconfig", str(config), "--namespace", SVC_NS, "--no-write",
            "--grpc-address", f"127.0.0.1:{port}", "--admin-address", "",
            "--gateway-port-map", "443:443",  # no gateway Service in this cluster
            "--worker-index", "1", "--worker-ready-fd", str(ready_w)])
        stop = threading.Event()
        caplog.set_level(logging.WARNING, logger="authz.kube.watch")
        worker = threading.Thread(target=serve, args=(args, stop), daemon=True)
        worker.start()
        try:
            api.wait_for(lambda: "API server unreachable" in caplog.text, timeout=10)
            # It has tried to load and failed: the port must be closed, not answering no-policy.
            assert not listening(port)
            assert read_ready(ready_r, 0) == ""
            api.start()
            word = read_ready(ready_r, 20)
            assert word.startswith("ready ") and int(word.split()[1]) >= 1, word
            client = Client(port)
            try:
                response = client.check(check_request(principal=CART, source_ip="10.0.0.1"))
                assert response.status.code == 0, response.dynamic_metadata
            finally:
                client.close()
        finally:
            stop.set()
            worker.join(20)
            os.close(ready_r)
        assert not worker.is_alive()

    def test_worker_stopped_before_loading_exits_cleanly(
        self, api: KubeEmulator, tmp_path: Path
    ) -> None:
        """SIGTERM (the stop event) during the first load: exit 0 without ever listening."""
        config = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        api.stop()
        port = free_port()
        args = build_arg_parser().parse_args([
            "--kube", "--kubeconfig", str(config), "--namespace", SVC_NS, "--no-write",
            "--grpc-address", f"127.0.0.1:{port}", "--admin-address", "",
            "--worker-index", "1"])
        stop = threading.Event()
        result: list[int] = []
        worker = threading.Thread(target=lambda: result.append(serve(args, stop)), daemon=True)
        worker.start()
        stop.set()
        worker.join(20)
        assert result == [0]
        assert not listening(port)
