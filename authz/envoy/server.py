"""The gRPC server Envoy calls: Authorization/Check, plus grpc.health.v1.

Check is registered as a raw-bytes method (no gRPC deserializer), so that
every body, however broken, reaches `parse_check_request` and is answered
with a CheckResponse; gRPC errors are left for transport failures. The
straight line of one Check: parse -> store.current -> decide -> response ->
recorder.

Two serving models, chosen with `serve --server-model`:

- `ThreadedAuthzServer` (the default): grpcio's threaded server, a pool of
  a few threads.
- `AuthzServer`: `grpc.aio` on one event loop in a thread of its own; the
  `async def` handler answers on the loop with no hand-over to a worker
  thread.

In both, the Check's record is handed to the recorder with `submit()` (an
append to its inbox) and recorded in batches by the recorder's own thread
(authz/observe/recorder.py).

Which one gives more depends on the traffic: under h2load's many streams
per connection the aio model answers ~1.4x the threaded one, while through
Envoy (one HTTP/2 connection, moderate concurrency) the threaded server with
2 threads answered 1.07-1.36x the aio one in every A/B measured, at about
the floors' CPU per request (docs/benchmarks.md, "Issue 14, final"). Either
way more cores mean more processes (`serve --workers`), never more threads:
a Check holds the GIL throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import _async as aio_health
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz.engine import Snapshot, decide, reject
from authz.gateway_ports import GatewayPorts
from authz.identity import IdentityResolver, UnknownWorkloads
from authz.model import Reason
from authz.records import DecisionRecord, NullRecorder, Recorder
from authz.store import PolicyStore
from authz.workloads import WorkloadIndex

from .request import MAX_REQUEST_BYTES, BadRequest, parse_check_request
from .response import build_check_response

log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
# Threads of the threaded server. A Check holds the GIL nearly throughout and
# never waits on I/O, so more threads only add hand-overs (futex wake-ups,
# ~2 context switches per Check per thread); one is too few, since a thread
# also waits inside grpcio for each request's message. Measured
# (docs/benchmarks.md, "Threads per process"): through Envoy 2 threads
# answered 1.01x the fastest floor against 0.84 with 3 and 0.81-0.95 with 4.
DEFAULT_THREADS = 2
CHECK_METHOD = f"/{SERVICE_NAME}/Check"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    address: str = "127.0.0.1:9000"
    """host:port to listen on; port 0 picks a free port (tests)."""
    reuse_port: bool = False
    """SO_REUSEPORT, for --workers: several processes accept on one port.
    Off otherwise, so that a second server on a busy port fails loudly
    instead of silently sharing it (gRPC turns it on by default)."""
    max_receive_bytes: int = MAX_REQUEST_BYTES + 1024
    """gRPC refuses larger messages before we read them (RESOURCE_EXHAUSTED)."""
    record_after_answer: bool = True
    """Hand each DecisionRecord to the recorder's `submit()` (recorded later, in
    batches, off the Check path) instead of recording it before answering
    (False: tests that need a Check held in flight by a slow recorder)."""
    threads: int = DEFAULT_THREADS
    """ThreadedAuthzServer only: threads answering Checks. A Check holds the GIL
    nearly all the time, so more threads add contention, not throughput."""


class CheckService:
    """One Check, from bytes to bytes. Holds no per-request state.

    `workloads`: the Pod index, or None when no Pod source is configured;
    `unknown_workloads`: whether a caller at an address no Pod has is refused.
    """

    def __init__(
        self,
        store: PolicyStore,
        workloads: WorkloadIndex | None = None,
        recorder: Recorder | None = None,
        ports: GatewayPorts | None = None,
        *,
        unknown_workloads: UnknownWorkloads = UnknownWorkloads.DENY,
    ) -> None:
        self.store = store
        self.workloads = workloads
        self.resolver = IdentityResolver(
            workloads.lookup if workloads is not None else None, unknown_workloads
        )
        self.recorder: Recorder = recorder or NullRecorder()
        # The recorder's cheap hand-off when it has one (DecisionRecorder.submit).
        self.submit = getattr(self.recorder, "submit", self.recorder.record)
        self.ports = ports

    def answer(self, data: bytes) -> tuple[bytes, DecisionRecord]:
        """The CheckResponse for `data` and the record of its decision (not yet
        recorded). Never raises: whatever goes wrong is a denial with an id."""
        started_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        identity = destination = None
        filter_kind = ""
        traceparent = tracestate = None
        try:
            ports = self.ports.translate if self.ports is not None else None
            parsed = parse_check_request(data, self.resolver, ports)
            snapshot: Snapshot | None = self.store.current  # read once: one snapshot per Check
            revision = snapshot.revision if snapshot is not None else 0
            filter_kind = parsed.filter
            traceparent, tracestate = parsed.traceparent, parsed.tracestate
            if isinstance(parsed, BadRequest):
                decision = reject(Reason.BAD_REQUEST, parsed.message, revision=revision)
            else:
                identity, destination = parsed.identity, parsed.destination
                if snapshot is None:
                    decision = reject(
                        Reason.NO_POLICY, "no policy loaded yet: everything is denied"
                    )
                else:
                    decision = decide(snapshot, identity, destination)
            response = build_check_response(decision, filter_kind)
        except Exception as e:  # fail closed: a bug denies, it never errors the RPC
            log.exception("Check failed")
            decision = reject(Reason.BAD_REQUEST, f"internal error: {type(e).__name__}")
            response = build_check_response(decision, filter_kind)
        record = DecisionRecord(
            decision=decision,
            identity=identity,
            destination=destination,
            start_unix_ns=started_ns,
            duration_ns=time.perf_counter_ns() - t0,
            traceparent=traceparent,
            tracestate=tracestate,
            filter=filter_kind,
        )
        return response, record

    def check(self, data: bytes, context: Any = None) -> bytes:
        """answer() and hand its record over (submit): the threaded server's handler."""
        response, record = self.answer(data)
        self.submit(record)
        return response

    def check_recording_first(self, data: bytes, context: Any = None) -> bytes:
        """answer() and record() before returning (record_after_answer=False)."""
        response, record = self.answer(data)
        self.recorder.record(record)
        return response


def check_handler(service: CheckService, *, record_after_answer: bool = True
                  ) -> grpc.GenericRpcHandler:
    """Authorization/Check on raw bytes (no (de)serializer on either side),
    answered on the server's event loop.

    With `record_after_answer` the record goes to the recorder's inbox
    (`submit`), else it is recorded before the answer is returned."""
    answer, recorder, submit = service.answer, service.recorder, service.submit

    if record_after_answer:
        async def check(data: bytes, context: Any) -> bytes:
            response, record = answer(data)
            submit(record)
            return response
    else:
        async def check(data: bytes, context: Any) -> bytes:
            response, record = answer(data)
            recorder.record(record)
            return response

    return grpc.method_handlers_generic_handler(
        SERVICE_NAME, {"Check": grpc.unary_unary_rpc_method_handler(check)}
    )


class _ServerBase:
    """What both serving models share: the Check service over one store, and a
    health status that turns SERVING once a policy is in force."""

    def __init__(
        self,
        store: PolicyStore,
        workloads: WorkloadIndex | None = None,
        recorder: Recorder | None = None,
        settings: ServerSettings | None = None,
        ports: GatewayPorts | None = None,
        *,
        unknown_workloads: UnknownWorkloads = UnknownWorkloads.DENY,
    ) -> None:
        self.settings = settings or ServerSettings()
        self.store = store
        self.service = CheckService(
            store, workloads, recorder, ports, unknown_workloads=unknown_workloads
        )
        self.port = 0
        self._setup()
        self._set_health(store.loaded)
        # Ready once a policy is in force; a later publish cannot unload it.
        store.subscribe(lambda _snapshot: self._set_health(True))

    def _setup(self) -> None:
        """The model's own health servicer and server state, before health is set."""
        raise NotImplementedError

    def _set_health(self, serving: bool) -> None:
        raise NotImplementedError


class AuthzServer(_ServerBase):
    """The Check service and its health service on one `grpc.aio` server
    (`serve --server-model aio`).

    Its event loop runs in a thread of its own ("egress-authz-grpc"), so the
    methods here are plain blocking calls from any other thread: `serve`'s
    main thread waits for signals, sources publish from theirs.
    """

    def _setup(self) -> None:
        self.health = aio_health.HealthServicer()
        self._serving = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._terminated = threading.Event()

    # -- health, from any thread ------------------------------------------------

    def _set_health(self, serving: bool) -> None:
        self._serving = serving
        self._on_loop(self._apply_health)

    async def _apply_health(self) -> None:
        # Reads the flag when it runs: of several updates in flight, the last wins.
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def enter_graceful_shutdown(self) -> None:
        """Health says NOT_SERVING from now on; Checks are still answered."""
        self._on_loop(self.health.enter_graceful_shutdown)

    def _on_loop(self, coroutine: Any, timeout: float = 5.0) -> None:
        """Run `coroutine()` on the server's loop and wait for it; nothing to do
        before start() (start applies the health status) or after stop()."""
        loop = self._loop
        if loop is None:
            return
        if self._thread is threading.current_thread():
            loop.create_task(coroutine())
            return
        try:
            done = asyncio.run_coroutine_threadsafe(coroutine(), loop)
        except RuntimeError:  # the loop closed meanwhile
            return
        with contextlib.suppress(futures.TimeoutError, futures.CancelledError):
            done.result(timeout)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> int:
        """Bind and start; returns the bound port. Raises RuntimeError if busy."""
        if self._loop is not None:
            raise RuntimeError("already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name="egress-authz-grpc", daemon=True
        )
        self._loop, self._thread = loop, thread
        self._terminated.clear()
        thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._start(), loop).result()
        except BaseException:
            self._shut_loop()
            raise
        return self.port

    async def _start(self) -> int:
        s = self.settings
        options = [
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
            ("grpc.max_receive_message_length", s.max_receive_bytes),
            # Envoy keeps one HTTP/2 connection per worker thread open for
            # long; let it ping to keep idle connections through NAT/LBs.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        server = grpc.aio.server(
            handlers=[
                check_handler(self.service, record_after_answer=s.record_after_answer)
            ],
            options=options,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self._apply_health()
        try:
            port: int = server.add_insecure_port(s.address)
        except RuntimeError:
            port = 0
        if not port:
            await server.stop(None)
            raise RuntimeError(f"cannot listen on {s.address}")
        await server.start()
        self._server = server
        return port

    def _run_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # Whatever is still pending (a health Watch stream) ends with the loop.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            self._terminated.set()

    def _shut_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = None
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # already closed
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: health says NOT_SERVING, new RPCs are refused,
        in-flight Checks get up to `grace` seconds to finish."""
        loop = self._loop
        if loop is None:
            return

        async def stop() -> None:
            await self.health.enter_graceful_shutdown()
            server, self._server = self._server, None
            if server is not None:
                await server.stop(grace)

        try:
            asyncio.run_coroutine_threadsafe(stop(), loop).result()
        finally:
            self._shut_loop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or `timeout` passed (False)."""
        if self._loop is None and self._thread is None:
            return True
        return self._terminated.wait(timeout)


class ThreadedAuthzServer(_ServerBase):
    """The same service on grpcio's threaded server (`serve --server-model threads`,
    the default): a pool of `settings.threads` threads.

    Kept beside the aio server because the better of the two depends on how
    busy the cores are (docs/benchmarks.md, "Serving model (issue 14)").
    """

    def _setup(self) -> None:
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._server: grpc.Server | None = None

    def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def enter_graceful_shutdown(self) -> None:
        self.health.enter_graceful_shutdown()

    def start(self) -> int:
        s = self.settings
        options = [
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
            ("grpc.max_receive_message_length", s.max_receive_bytes),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.threads, thread_name_prefix="check"),
            handlers=[grpc.method_handlers_generic_handler(
                SERVICE_NAME,
                {"Check": grpc.unary_unary_rpc_method_handler(
                    self.service.check if s.record_after_answer
                    else self.service.check_recording_first)},
            )],
            options=options,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            port: int = server.add_insecure_port(s.address)
        except RuntimeError:
            port = 0
        if not port:
            raise RuntimeError(f"cannot listen on {s.address}")
        server.start()
        self.port = port
        self._server = server
        return port

    def stop(self, grace: float = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or `timeout` passed (False)."""
        if self._server is None:
            return True
        return not self._server.wait_for_termination(timeout)
