"""The gRPC server Envoy calls: Authorization/Check, plus grpc.health.v1.

Check is registered as a raw-bytes method (no gRPC deserializer), so that
every body, however broken, reaches `parse_check_request` and is answered
with a CheckResponse; gRPC errors are left for transport failures. The
straight line of one Check: parse -> store.current -> decide -> response ->
recorder.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
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
CHECK_METHOD = f"/{SERVICE_NAME}/Check"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    address: str = "127.0.0.1:9000"
    """host:port to listen on; port 0 picks a free port (tests)."""
    threads: int = 4
    """Threads answering Checks in this process. A Check holds the GIL nearly
    all the time, so more threads add GIL contention, not throughput: with
    h2load here, 2-4 threads beat 8 and 16 (see docs/benchmarks.md)."""
    reuse_port: bool = False
    """SO_REUSEPORT, for --workers: several processes accept on one port.
    Off otherwise, so that a second server on a busy port fails loudly
    instead of silently sharing it (gRPC turns it on by default)."""
    max_receive_bytes: int = MAX_REQUEST_BYTES + 1024
    """gRPC refuses larger messages before we read them (RESOURCE_EXHAUSTED)."""


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
        self.ports = ports

    def check(self, data: bytes, context: Any = None) -> bytes:
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
        except Exception as e:  # fail closed: a bug denies, it never errors the RPC
            log.exception("Check failed")
            decision = reject(Reason.BAD_REQUEST, f"internal error: {type(e).__name__}")
        response = build_check_response(decision, filter_kind)
        self.recorder.record(
            DecisionRecord(
                decision=decision,
                identity=identity,
                destination=destination,
                start_unix_ns=started_ns,
                duration_ns=time.perf_counter_ns() - t0,
                traceparent=traceparent,
                tracestate=tracestate,
                filter=filter_kind,
            )
        )
        return response


def check_handler(service: CheckService) -> grpc.GenericRpcHandler:
    """Authorization/Check on raw bytes: no (de)serializer on either side."""
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {"Check": grpc.unary_unary_rpc_method_handler(service.check)},
    )


class AuthzServer:
    """The Check service and its health service on one gRPC server."""

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
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.port = 0
        self._server: grpc.Server | None = None
        self._set_health(store.loaded)
        # Ready once a policy is in force; a later publish cannot unload it.
        store.subscribe(lambda _snapshot: self._set_health(True))

    def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> int:
        """Bind and start; returns the bound port. Raises RuntimeError if busy."""
        s = self.settings
        options = [
            ("grpc.so_reuseport", 1 if s.reuse_port else 0),
            ("grpc.max_receive_message_length", s.max_receive_bytes),
            # Envoy keeps one HTTP/2 connection per worker thread open for
            # long; let it ping to keep idle connections through NAT/LBs.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.threads, thread_name_prefix="check"),
            handlers=[check_handler(self.service)],
            options=options,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(s.address)
        if not self.port:
            raise RuntimeError(f"cannot listen on {s.address}")
        server.start()
        self._server = server
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: health says NOT_SERVING, new RPCs are refused,
        in-flight Checks get up to `grace` seconds to finish."""
        self.health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout) if self._server else True
