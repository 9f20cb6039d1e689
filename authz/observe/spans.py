"""OpenTelemetry spans for recorded decisions, built off the serving process.

The recorder (authz/observe/recorder.py) hands each kept decision here. Building an
SDK span and encoding it to OTLP costs a few hundred microseconds of Python,
as much as half a Check, and in the serving process it would hold the GIL
against the Check path. So `serve` runs a child process (`python -m
authz.observe.spans`) that reads one compact line per span from a pipe and does the
SDK work there; the serving process pays one non-blocking pipe write, and
drops (counted) when the pipe is full. `SpanSink` is the same span building
in-process, for tests and for the child itself.

Export follows the standard variables: OTEL_TRACES_EXPORTER (otlp, console,
none), OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT / _PROTOCOL / _HEADERS / ...,
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER,
OTEL_BSP_*. With none of them set, there are no spans at all.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.sdk.trace.sampling import Decision as SamplingDecision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, get_current_span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..records import DecisionRecord
from .decisionlog import LOG_FIELDS
from .metrics import METRICS, Metrics

log = logging.getLogger(__name__)

SPAN_NAME = "egress-authz.check"
ATTRIBUTE_PREFIX = "egress_authz."
PIPE_BUF = 4096  # POSIX: writes up to this size to a pipe are all-or-nothing
_PIPE_SIZE = 1 << 20  # ask Linux for a 1 MiB pipe: ~1,500 spans of burst
_F_SETPIPE_SZ = 1031
# How long `serve` waits at shutdown for the exporter process to send what it
# holds: longer than one OTLP export's default timeout (10 s), so that a slow
# collector still gets the last batch (the chart's grace period allows it).
FLUSH_TIMEOUT = 15.0


class TracingConfigError(ValueError):
    """The OTEL_* environment asks for something this service cannot export to."""


# Attribute names: egress_authz.<log field>, so that a span and its log line
# read the same; the span's own start, end and trace id replace time,
# latency_us and trace_id. The rpc.* keys are the semantic conventions for
# what this span is: the server side of one ext_authz Check call.
_SPAN_FIELDS = tuple(f for f in LOG_FIELDS if f not in ("time", "latency_us", "trace_id"))
_RPC_ATTRIBUTES = {
    "rpc.system": "grpc",
    "rpc.service": "envoy.service.auth.v3.Authorization",
    "rpc.method": "Check",
}


_SPAN_KEYS = tuple((f, ATTRIBUTE_PREFIX + f) for f in _SPAN_FIELDS)
_ALLOWED_KEY = ATTRIBUTE_PREFIX + "allowed"


def span_attributes(fields: Mapping[str, Any], allowed: bool) -> dict[str, str | int | bool]:
    attrs: dict[str, str | int | bool] = dict(_RPC_ATTRIBUTES)
    get = fields.get
    for name, key in _SPAN_KEYS:
        value = get(name)
        if value is not None:  # OpenTelemetry attributes may not be null
            attrs[key] = value
    attrs[_ALLOWED_KEY] = allowed
    return attrs


class _CountingExporter(SpanExporter):
    """Passes spans on to `inner`, counting how many the batch processor handed over."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.handed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.handed += len(spans)
        return self.inner.export(spans)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _DropCountingProcessor(SpanProcessor):
    """A BatchSpanProcessor whose full-queue drops are counted in /metrics.

    The SDK drops with one log line; the operator should see it like every
    other drop. The queue's fill is derived from public calls only (spans
    ended here minus spans handed to the exporter): no SDK private state.
    """

    def __init__(self, exporter: SpanExporter, max_queue_size: int, *,
                 metrics: Metrics, **kw: Any) -> None:
        self._span_dropped = metrics.trace_dropped.labels("span")
        self._exporter = _CountingExporter(exporter)
        self._batch = BatchSpanProcessor(self._exporter, max_queue_size=max_queue_size, **kw)
        self._max = max_queue_size
        self._ended = 0
        self._dropped = 0

    def on_end(self, span: ReadableSpan) -> None:
        if self._ended - self._dropped - self._exporter.handed >= self._max:
            self._dropped += 1
            self._span_dropped.inc()
        self._ended += 1
        self._batch.on_end(span)

    def shutdown(self) -> None:
        self._batch.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


class SpanSink:
    """Builds one SERVER span per kept decision and hands it to the batch processors.

    The span is made finished, as a ReadableSpan, rather than started and
    ended through a Tracer: the decision is over by the time it is recorded,
    and this skips the SDK's per-attribute validation of a live span (our
    attributes are plain strings, ints and bools). The sampler from
    OTEL_TRACES_SAMPLER is still asked. Called from one thread only (the
    recorder's, or the child's main loop).
    """

    def __init__(self, provider: TracerProvider, processors: list[SpanProcessor]) -> None:
        self.provider = provider  # holds the resource and the sampler from the env
        self.processors = processors
        self._resource = provider.resource
        self._sampler = provider.sampler
        self._scope = InstrumentationScope("egress-authz")
        self._ids = RandomIdGenerator()
        self._propagator = TraceContextTextMapPropagator()
        self._sampled = TraceFlags(TraceFlags.SAMPLED)

    def emit(self, rec: DecisionRecord, fields: Mapping[str, Any], line: str = "") -> None:
        self.emit_raw(
            fields,
            rec.start_unix_ns,
            rec.duration_ns,
            rec.traceparent,
            rec.tracestate,
            rec.decision.allowed,
        )

    def emit_raw(
        self,
        fields: Mapping[str, Any],
        start_ns: int,
        duration_ns: int,
        traceparent: str | None,
        tracestate: str | None,
        allowed: bool,
    ) -> None:
        parent_context = None
        parent: SpanContext | None = None
        if traceparent:
            carrier = {"traceparent": traceparent}
            if tracestate:
                carrier["tracestate"] = tracestate
            parent_context = self._propagator.extract(carrier)
            parent = get_current_span(parent_context).get_span_context()
            if not parent.is_valid:  # a malformed header: the span is a root
                parent, parent_context = None, None
        if parent is not None:
            trace_id = parent.trace_id
        else:
            # The recorder chose it and wrote it in the log line already.
            chosen = fields.get("trace_id")
            trace_id = int(chosen, 16) if chosen else self._ids.generate_trace_id()
        attributes = span_attributes(fields, allowed)
        sampling = self._sampler.should_sample(
            parent_context, trace_id, SPAN_NAME, SpanKind.SERVER, attributes
        )
        if sampling.decision is not SamplingDecision.RECORD_AND_SAMPLE:
            return  # RECORD_ONLY spans are never exported: not worth building
        if sampling.attributes:
            attributes.update(sampling.attributes)
        context = SpanContext(
            trace_id,
            self._ids.generate_span_id(),
            is_remote=False,
            trace_flags=self._sampled,
            trace_state=sampling.trace_state,
        )
        span = ReadableSpan(
            name=SPAN_NAME,
            context=context,
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            instrumentation_scope=self._scope,
            start_time=start_ns,
            end_time=start_ns + duration_ns,
        )
        for processor in self.processors:
            processor.on_end(span)

    def end_batch(self) -> None:
        return None  # the BatchSpanProcessor batches on its own

    def flush(self, timeout: float = 5.0) -> bool:
        return all(p.force_flush(int(timeout * 1000)) for p in self.processors)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Export everything held (within `timeout`), then stop the processors."""
        self.flush(timeout)
        for processor in self.processors:
            processor.shutdown()


class SpanPipe:
    """The serving process's end: one line per span to the `authz.observe.spans` child.

    A line is `[start_ns, duration_ns, traceparent, tracestate, allowed]`, a
    tab, and the decision-log JSON the recorder made anyway. Lines are
    gathered into writes of at most PIPE_BUF bytes, which a pipe takes whole
    or refuses; a refused write (the child is behind) drops its lines and
    counts them under sink="span". Nothing here ever blocks.
    """

    RESTART_AFTER = 10.0  # seconds between attempts to restart an exporter that died

    def __init__(self, env: Mapping[str, str] | None = None,
                 metrics: Metrics | None = None) -> None:
        self._env = dict(os.environ if env is None else env)
        # Drops count where /metrics reads them (serve: the process's own set).
        self._span_dropped = (metrics or METRICS).trace_dropped.labels("span")
        self._chunk: list[bytes] = []
        self._chunk_size = 0
        self._dead_since: float | None = None
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "authz.observe.spans"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # stdout is the parent's decision log
            env=self._env,
            # Its own process group: a SIGTERM or Ctrl-C to serve's group must
            # not end it before serve has handed it the last spans (it ends
            # when the pipe closes, having exported them).
            process_group=0,
        )
        assert self.proc.stdin is not None
        self._fd = self.proc.stdin.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        os.set_blocking(self._fd, False)
        self._dead_since = None

    def _restart_if_due(self) -> bool:
        """After the child died: start a new one, at most every RESTART_AFTER seconds."""
        assert self._dead_since is not None
        if time.monotonic() - self._dead_since < self.RESTART_AFTER:
            return False
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.poll()  # reap it
        try:
            self._start()
        except OSError as e:
            self._dead_since = time.monotonic()
            log.error("span exporter process could not be restarted: %s", e)
            return False
        log.warning("span exporter process restarted")
        return True

    def emit(self, rec: DecisionRecord, fields: Mapping[str, Any], line: str) -> None:
        header = json.dumps(
            [
                rec.start_unix_ns,
                rec.duration_ns,
                rec.traceparent,
                rec.tracestate,
                rec.decision.allowed,
            ],
            separators=(",", ":"),
        )
        data = f"{header}\t{line}\n".encode()
        if len(data) > PIPE_BUF:
            # Only a huge path or principal gets here; the span keeps their start.
            short = dict(
                fields,
                path=(fields.get("path") or "")[:256] or None,
                principal=(fields.get("principal") or "")[:256] or None,
            )
            data = f"{header}\t{json.dumps(short, separators=(',', ':'))}\n".encode()
            if len(data) > PIPE_BUF:
                self._span_dropped.inc()
                return
        if self._chunk_size + len(data) > PIPE_BUF:
            self.end_batch()
        self._chunk.append(data)
        self._chunk_size += len(data)

    def end_batch(self) -> None:
        if not self._chunk:
            return
        chunk, lines = b"".join(self._chunk), len(self._chunk)
        self._chunk, self._chunk_size = [], 0
        if self._dead_since is not None and not self._restart_if_due():
            self._span_dropped.inc(float(lines))
            return
        try:
            os.write(self._fd, chunk)
        except BlockingIOError:
            self._span_dropped.inc(float(lines))
        except OSError as e:  # the child is gone (EPIPE): spans pause, Checks do not
            self._dead_since = time.monotonic()
            self._span_dropped.inc(float(lines))
            log.error(
                "span exporter process exited (%s); spans are dropped until it is "
                "restarted in %.0fs",
                e,
                self.RESTART_AFTER,
            )

    def flush(self, timeout: float = 5.0) -> bool:
        self.end_batch()
        return self._dead_since is None

    def shutdown(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Hand over what is left and close the pipe: the child reads to the end,
        exports everything and exits. Only a child still exporting after
        `timeout` (a collector that does not answer) is killed."""
        self.end_batch()
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "span exporter still exporting after %.1fs (collector unreachable?); "
                "stopping it: the spans it held are lost", timeout,
            )
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------
# Configuration from the environment


def _resource() -> Resource:
    resource = Resource.create({})  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    name = str(resource.attributes.get("service.name", ""))
    if name.startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "egress-authz"}))
    return resource


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"  # what the Python SDK's `otlp` exporter means; docs/tracing.md says so
    ).strip()
    # The exporters read their endpoint, headers, certificates and timeout
    # from the same OTEL_EXPORTER_OTLP_* variables themselves.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise TracingConfigError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use grpc or http/protobuf"
    )


def exporter_names(environ: Mapping[str, str] | None = None) -> list[str]:
    """The exporters the OTEL_* variables ask for; [] means tracing is off.

    Unlike the SDK's auto-configuration, an unset OTEL_TRACES_EXPORTER only
    means OTLP when an OTLP endpoint is set: a service started with no
    telemetry settings must not spend anything on spans for nobody.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if not any(env.get(k) for k in endpoints):
            return []
        names = "otlp"
    out = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name in ("", "none"):
            continue
        if name not in ("otlp", "console"):
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported: use otlp, console or none"
            )
        if name == "otlp":
            _check_protocol(env)
        out.append(name)
    return out


def _check_protocol(env: Mapping[str, str]) -> None:
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    if protocol and protocol.strip() not in ("grpc", "http/protobuf"):
        raise TracingConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use grpc or http/protobuf"
        )


def exporters_from_env(environ: Mapping[str, str] | None = None) -> list[SpanExporter]:
    env = os.environ if environ is None else environ
    out: list[SpanExporter] = []
    for name in exporter_names(env):
        if name == "otlp":
            out.append(_otlp_exporter(env))
        else:
            out.append(ConsoleSpanExporter(out=sys.stderr))  # stdout is the decision log
    return out


def span_sink(
    exporters: list[SpanExporter],
    environ: Mapping[str, str] | None = None,
    *,
    max_queue_size: int | None = None,
    schedule_delay_millis: float | None = None,
    metrics: Metrics | None = None,
) -> SpanSink | None:
    """An in-process SpanSink batching to `exporters`, or None when there are none."""
    if not exporters:
        return None
    env = os.environ if environ is None else environ
    # The recorder has already chosen which decisions get a span (all denials
    # and audits, a share of allows), so the SDK samples everything it is
    # given, unless the operator set OTEL_TRACES_SAMPLER on purpose. A
    # parent-based default would lose denials whose caller did not sample.
    sampler = None if env.get("OTEL_TRACES_SAMPLER") else ALWAYS_ON
    provider = TracerProvider(sampler=sampler, resource=_resource())
    if max_queue_size is None:  # the SDK's own default and variable
        max_queue_size = int(env.get("OTEL_BSP_MAX_QUEUE_SIZE") or 2048)
    processors: list[SpanProcessor] = [
        _DropCountingProcessor(
            exporter,
            max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay_millis,
            # A small queue needs batches no larger than itself (the SDK insists).
            max_export_batch_size=min(512, max_queue_size),
            metrics=metrics or METRICS,
        )
        for exporter in exporters
    ]
    return SpanSink(provider, processors)


def spans_from_env(
    environ: Mapping[str, str] | None = None, metrics: Metrics | None = None
) -> SpanPipe | None:
    """What `serve` records spans with: a SpanPipe to a child exporter, or None.

    The configuration is checked here, so that a bad OTEL_* setting stops
    `serve` at startup with a clear message instead of in the child.
    """
    if not exporter_names(environ):
        return None
    return SpanPipe(environ, metrics)


# ---------------------------------------------------------------------------
# The child: `python -m authz.observe.spans`, started by SpanPipe


def child_main() -> int:
    # Ctrl-C in a terminal, or a SIGTERM to the process group, reaches the
    # child too: it ignores both and ends when the parent closes the pipe,
    # having read every span sent before and exported them (flush, then stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Spans matter less than answers: when CPU is short, the kernel should
    # run the serving process first. The pipe then fills and the serving
    # process drops spans (and counts them) instead of answering slower.
    with contextlib.suppress(OSError):
        os.nice(10)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.WARNING,
        format="%(asctime)s egress-authz[spans] %(levelname)s %(message)s",
    )
    sink = span_sink(exporters_from_env())
    if sink is None:
        return 0
    for raw in sys.stdin.buffer:
        try:
            head, _, line = raw.decode("utf-8").partition("\t")
            start_ns, duration_ns, traceparent, tracestate, allowed = json.loads(head)
            sink.emit_raw(json.loads(line), start_ns, duration_ns, traceparent, tracestate, allowed)
        except Exception:  # one bad line must not end the exporter
            log.exception("bad span line")
    sink.shutdown(FLUSH_TIMEOUT - 1.0)
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
