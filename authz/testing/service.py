"""`egress-authz serve` as a subprocess, the way Envoy meets it in a pod.

Ready means: the process printed `egress-authz: serving Check on ADDR` on
stderr, or its gRPC health service answers SERVING (whichever comes first).
A process that exits or stays silent is an error carrying its stderr, never
a skip: a missing service is a failure of the end-to-end suite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

READY_LINE = "egress-authz: serving Check on"


class ServiceError(RuntimeError):
    pass


class ServiceProcess:
    """Runs `python -m authz serve` on 127.0.0.1:`port`; restartable on the same port.

    `policies` None: no --policies (give the source in `extra_args`, e.g. --kube).
    """

    def __init__(
        self,
        policies: Path | None,
        port: int,
        *,
        workloads: Path | None = None,
        admin_port: int | None = None,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        start_timeout: float = 20.0,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.policies = policies
        self.workloads = workloads
        self.port = port
        self.admin_port = admin_port
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.env = env or {}  # added to os.environ (e.g. PYTHONPATH of another build)
        self.cwd = cwd
        self.on_line = on_line  # each stderr line as it arrives (the demo's reload notes)
        self.process: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "authz", "serve", "--grpc-address", self.address]
        if self.policies is not None:
            cmd += ["--policies", str(self.policies)]
        if self.workloads is not None:
            cmd += ["--workloads", str(self.workloads)]
        # No admin port asked for: none at all. The default 127.0.0.1:9090 may be
        # anyone's on a shared machine, and `serve` refuses to start without it.
        admin = f"127.0.0.1:{self.admin_port}" if self.admin_port is not None else ""
        cmd += ["--admin-address", admin]
        return cmd + self.extra_args

    # ------------------------------------------------------------ lifecycle

    def start(self) -> ServiceProcess:
        if self.process is not None and self.process.poll() is None:
            raise ServiceError("already running")
        self._ready.clear()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        threading.Thread(target=self._drain, args=(self.process,), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.1) or self._health_serving():
                return self
            if self.process.poll() is not None:
                time.sleep(0.1)  # let the drain thread collect the last lines
                raise ServiceError(
                    f"`{' '.join(self.command())}` exited with {self.process.returncode}:\n"
                    + self.output_tail()
                )
        self.stop()
        raise ServiceError(
            f"egress-authz serve not ready after {self.start_timeout}s:\n" + self.output_tail()
        )

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # graceful: drains in-flight checks
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)

    def restart(self) -> ServiceProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ServiceError("not running")
        return self.process.pid

    # --------------------------------------------------------------- output

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        log = self.log_path.open("a") if self.log_path else None
        try:
            for line in proc.stderr:
                with self._lock:
                    self._lines.append(line)
                if log:
                    log.write(line)
                    log.flush()
                if READY_LINE in line:
                    self._ready.set()
                if self.on_line is not None:
                    self.on_line(line.rstrip("\n"))
        finally:
            if log:
                log.close()

    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def output_tail(self, lines: int = 40) -> str:
        with self._lock:
            return "".join(self._lines[-lines:])

    def _health_serving(self) -> bool:
        try:
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc
        except ImportError:
            return False
        with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.3)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
        return False
