"""The least an ext_authz server can do: answer every Check with OK.

In two flavours of Python gRPC server, the threaded `grpc.server`
(`FloorServer`) and the asyncio `grpc.aio.server` (`--aio`, `serve_aio`):
the benchmarks compare each figure with the better of the two. Two uses. As
the benchmark floor, it is the cost of Python grpcio itself, which our
service is measured against. As a probe (threaded only), it records the raw
CheckRequest bytes Envoy sends, which is how the field notes in the
istio/envoy/ configs were verified and how bench/ gets a request to replay.

    python -m authz.testing.floor --address 127.0.0.1:9000 [--record-dir DIR]
    python -m authz.testing.floor --address 127.0.0.1:9000 --aio
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"

# Threads of the threaded floor: its fastest setting here (h2load: 2 threads
# 6,060 checks/s at 197 µs a Check, 4 threads 5,045 / 239, 16 threads 5,051 /
# 244; also the fastest through Envoy). The floor is the best Python can do,
# so it runs at its best setting (docs/benchmarks.md, "Threads per process").
FLOOR_THREADS = 2

# CheckResponse{status: google.rpc.Status{code: 0}}: field 1, length 0.
# Hand-encoded so the floor pays for no protobuf work at all.
OK_RESPONSE = b"\x0a\x00"


class FloorServer:
    """A grpcio server whose Check handler returns OK_RESPONSE.

    With `record=True` every request's bytes are kept in `requests` (and,
    with `record_dir`, written there as 0001.bin, 0002.bin, ...)."""

    def __init__(
        self,
        address: str = "127.0.0.1:0",
        *,
        record: bool = False,
        record_dir: Path | None = None,
        max_workers: int = FLOOR_THREADS,
    ) -> None:
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._record = record or record_dir is not None
        self._record_dir = record_dir
        if record_dir is not None:
            record_dir.mkdir(parents=True, exist_ok=True)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
        handler = grpc.unary_unary_rpc_method_handler(
            self._check_recording if self._record else self._check,
            request_deserializer=None,  # raw bytes in, raw bytes out
            response_serializer=None,
        )
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "envoy.service.auth.v3.Authorization", {"Check": handler}
                ),
            )
        )
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"

    @staticmethod
    def _check(request: bytes, context: grpc.ServicerContext) -> bytes:
        return OK_RESPONSE

    def _check_recording(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.requests.append(request)
            n = len(self.requests)
        if self._record_dir is not None:
            (self._record_dir / f"{n:04d}.bin").write_bytes(request)
        return OK_RESPONSE

    def start(self) -> FloorServer:
        self._server.start()
        return self

    def stop(self, grace: float = 0.5) -> None:
        self._server.stop(grace).wait(grace + 1)

    def wait(self) -> None:
        self._server.wait_for_termination()

    def __enter__(self) -> FloorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_aio(address: str) -> None:
    """The asyncio floor: one event loop, an `async def` Check returning OK_RESPONSE."""

    async def check(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return OK_RESPONSE

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "envoy.service.auth.v3.Authorization",
                {"Check": grpc.unary_unary_rpc_method_handler(check)},
            ),
        )
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(server.stop(0.5)))
    print(f"floor: serving Check on {address.rsplit(':', 1)[0]}:{port} (aio)",
          file=sys.stderr, flush=True)
    await server.wait_for_termination()


class FloorProcess:
    """The floor server in a process of its own, so that its CPU time is its own.
    `aio=True`: the asyncio flavour (`--aio`) instead of the threaded one."""

    def __init__(self, port: int, workers: int = FLOOR_THREADS, *, aio: bool = False) -> None:
        self.port = port
        self.workers = workers
        self.aio = aio
        self.process: subprocess.Popen[str] | None = None
        self.ready_line = ""

    def start(self, timeout: float = 15.0) -> FloorProcess:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "authz.testing.floor",
                "--address",
                f"127.0.0.1:{self.port}",
                "--workers",
                str(self.workers),
                *(["--aio"] if self.aio else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        line = self.process.stderr.readline()  # the ready line, or a traceback's first
        self.ready_line = line.strip()
        if "serving Check" not in line:
            self.stop()
            raise RuntimeError(f"floor server did not start: {line}")
        return self

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("floor server not running")
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz.testing.floor", description=__doc__)
    parser.add_argument("--address", default="127.0.0.1:9000")
    parser.add_argument("--record-dir", type=Path)
    parser.add_argument("--workers", type=int, default=FLOOR_THREADS,
                        help="grpcio thread pool size (default: %(default)s)")
    parser.add_argument("--aio", action="store_true", help="grpc.aio server, one event loop")
    args = parser.parse_args(argv)
    if args.aio:
        if args.record_dir:
            parser.error("--record-dir works with the threaded floor only")
        asyncio.run(serve_aio(args.address))
        return 0
    server = FloorServer(args.address, record_dir=args.record_dir, max_workers=args.workers)
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    print(f"floor: serving Check on {server.address}", file=sys.stderr, flush=True)
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
