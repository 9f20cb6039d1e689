"""Recording of decisions, after the answer and off the Check path.

The gRPC server hands each DecisionRecord to `DecisionRecorder.record()`,
which does only cheap, bounded work inline (metrics, the ring buffer the
admin endpoint reads, the decision-log line rendered by one f-string, one
append to a bounded queue). One background thread then explains denials,
writes the JSON-lines decision log and hands kept decisions to a span sink
(authz/spans.py: OpenTelemetry, configured by the standard OTEL_* variables).
Full queues drop and count in `egress_authz_trace_records_dropped_total`;
nothing here waits for a reader or a collector.

Why the line is rendered inline: rendering it on the background thread cost
the same few microseconds plus, per record, a GIL hand-over between that
thread and the gRPC threads (futex wake-ups, context switches, and a gRPC
thread back from I/O waiting for the GIL): ~50 µs of CPU per Check on top of
the rendering, measured (docs/benchmarks.md, "Service"). Inline, the
background thread wakes every `flush_interval`, takes whole batches and
spends its time in write(2), with the GIL released.
"""

from __future__ import annotations

import collections
import functools
import json
import json.encoder
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Protocol

from .bounded import DEFAULT_LIMITS, RecordLimits, bound_explanation, bound_record, cut
from .metrics import CHECK_SECONDS, CHECKS, TRACE_DROPPED
from .model import Mode, Reason, RuleCheck, Verdict
from .model import Protocol as NetProtocol
from .records import DecisionRecord
from .ring import RingBuffer, Subscription, source_of

__all__ = ["RingBuffer", "Subscription"]  # their home is authz.ring; imported from here too

log = logging.getLogger(__name__)


# The decision log's fields, in output order: a public contract (docs/tracing.md,
# "Decision log"). Every line carries every key; absent values are null.
LOG_FIELDS = (
    "time",
    "decision_id",
    "verdict",
    "reason",
    "rule",
    "owner",
    "namespace",
    "service_account",
    "pod",
    "source_ip",
    "principal",
    "host",
    "port",
    "sni",
    "http_host",
    "method",
    "path",
    "protocol",
    "filter",
    "mode",
    "revision",
    "policy_source",
    "latency_us",
    "trace_id",
)


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """How much is kept and how much is traced; built once by `serve`."""

    ring_size: int = 10_000
    """Decisions kept in memory for the admin endpoint (oldest evicted first)."""
    queue_size: int = 10_000
    """Records waiting for the log/span thread; beyond it records are dropped and counted."""
    allow_ratio: float = 0.1
    """Share of allow verdicts that get a span; deny and audit always get one, and so
    does an allow whose caller's traceparent is sampled. 0.1 by default: allows are
    most of the traffic and the least read, and each span costs the exporter
    process ~90 µs of CPU, which in a pod comes out of the same CPU limit."""
    decision_log: bool = True
    """Write one JSON line per decision to the log stream (stdout by default)."""
    flush_interval: float = 0.05
    """Seconds the background thread sleeps when idle: the log/stream latency bound."""
    limits: RecordLimits = DEFAULT_LIMITS
    """Size caps of recorded fields, and whether query values are kept (authz.bounded)."""
    max_namespace_labels: int = 1000
    """Distinct `namespace` label values on the checks counter; later ones count as
    `_other` (principals can be forged: the metric must not grow without end)."""


# ---------------------------------------------------------------------------
# Records as plain values: the decision log, the admin API and span attributes
# all read these, so the three always agree on names.


_second_text: tuple[int, str] = (-1, "")


def _rfc3339(unix_ns: int) -> str:
    """UTC with milliseconds; the text of the second is reused (one per line adds up)."""
    global _second_text
    second, ms = divmod(unix_ns // 1_000_000, 1000)
    cached_second, text = _second_text
    if second != cached_second:
        text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_text = (second, text)
    return f"{text}{ms:03d}Z"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent header, or None when it is not one."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower()


def _sampled(traceparent: str | None) -> bool:
    """Whether a W3C traceparent carries the sampled flag (version 00 layout)."""
    if not traceparent or len(traceparent) < 55 or trace_id_of(traceparent) is None:
        return False
    try:
        return bool(int(traceparent[53:55], 16) & 1)
    except ValueError:
        return False


def record_fields(rec: DecisionRecord, trace_id: str | None = None) -> dict[str, Any]:
    """The flat decision-log view of one record (keys: LOG_FIELDS)."""
    d = rec.decision
    ident = rec.identity
    dest = rec.destination
    workload = ident.workload if ident is not None else None
    return {
        "time": _rfc3339(rec.start_unix_ns),
        "decision_id": d.decision_id,
        "verdict": str(d.verdict),
        "reason": str(d.reason),
        "rule": d.rule,
        "owner": d.owner,
        "namespace": d.namespace or (workload.namespace if workload else None) or None,
        "service_account": d.service_account
        or (workload.service_account if workload else None)
        or None,
        "pod": (workload.name or None) if workload else None,
        "source_ip": (ident.source_ip or None) if ident else None,
        "principal": (ident.principal or None) if ident else None,
        "host": d.host or None,
        "port": dest.port if dest else None,
        "sni": dest.sni if dest else None,
        "http_host": dest.http_host if dest else None,
        "method": dest.method if dest else None,
        "path": dest.path if dest else None,
        "protocol": str(dest.protocol) if dest else None,
        "filter": rec.filter or None,
        "mode": str(d.mode),
        "revision": d.revision,
        "policy_source": d.policy_source,
        "latency_us": round(rec.duration_ns / 1000, 1),
        "trace_id": trace_id or trace_id_of(rec.traceparent),
    }


# The C string encoder json.dumps(..., ensure_ascii=False) uses: quotes and
# escapes '"', '\\' and control characters, keeps the rest as is.
_json_str: Callable[[str], str] = json.encoder.encode_basestring


class _JsonStrings(dict[str | None, str]):
    """JSON string literals of recent short values, by value.

    A log line has ~16 text fields and nearly all of them (namespace, pod,
    principal, host, rule, ...) repeat from Check to Check: a dict hit is a C
    call, where a Python helper per field cost ~0.5 µs each. Bounded: values
    over _MEMO_CHARS are encoded and not kept, and the memo starts afresh at
    _MEMO_SIZE entries, so hostile variety costs a re-encode, never memory.
    """

    def __missing__(self, value: str | None) -> str:
        if value is None:
            return "null"
        text = _json_str(value)
        if len(value) <= _MEMO_CHARS:
            if len(self) >= _MEMO_SIZE:
                self.clear()
            self[value] = text
        return text


_MEMO_CHARS = 256
_MEMO_SIZE = 4096
_jstr: Callable[[str | None], str] = _JsonStrings().__getitem__


def _jpath(value: str | None) -> str:
    """Paths vary per request (ids, queries): encoded each time, not memoised."""
    return "null" if value is None else _json_str(value)


# The JSON of every enum value a line carries (verdict, reason, mode, protocol).
_ENUM_JSON: dict[object, str] = {
    member: _json_str(str(member))
    for enum_type in (Verdict, Reason, Mode, NetProtocol)
    for member in enum_type
}


def log_line(rec: DecisionRecord, trace_id: str | None) -> str:
    """The decision-log line of one record, without the newline.

    The same text as `json.dumps(record_fields(rec, trace_id), separators=(",", ":"),
    ensure_ascii=False)` (a test holds the two together), in a third of the
    time: it runs on the Check path. `trace_id` is the one the line names:
    the caller's (`trace_id_of(rec.traceparent)`) or a new one for a span.
    """
    d = rec.decision
    ident = rec.identity
    dest = rec.destination
    e = _ENUM_JSON
    workload = ident.workload if ident is not None else None
    if workload is not None:
        namespace = d.namespace or workload.namespace or None
        service_account = d.service_account or workload.service_account or None
        pod = workload.name or None
    else:
        namespace = d.namespace or None
        service_account = d.service_account or None
        pod = None
    if ident is not None:
        source_ip, principal = _jstr(ident.source_ip or None), _jstr(ident.principal or None)
        who = f'"source_ip":{source_ip},"principal":{principal}'
    else:
        who = '"source_ip":null,"principal":null'
    if dest is not None:
        port = "null" if dest.port is None else int.__repr__(dest.port)
        where = (
            f'"port":{port},"sni":{_jstr(dest.sni)},"http_host":{_jstr(dest.http_host)},'
            f'"method":{_jstr(dest.method)},"path":{_jpath(dest.path)},'
            f'"protocol":{e[dest.protocol]}'
        )
    else:
        where = '"port":null,"sni":null,"http_host":null,"method":null,"path":null,"protocol":null'
    revision = "null" if d.revision is None else int.__repr__(d.revision)
    return (
        f'{{"time":"{_rfc3339(rec.start_unix_ns)}","decision_id":{_json_str(d.decision_id)},'
        f'"verdict":{e[d.verdict]},"reason":{e[d.reason]},'
        f'"rule":{_jstr(d.rule)},"owner":{_jstr(d.owner)},'
        f'"namespace":{_jstr(namespace)},"service_account":{_jstr(service_account)},'
        f'"pod":{_jstr(pod)},{who},"host":{_jstr(d.host or None)},{where},'
        f'"filter":{_jstr(rec.filter or None)},"mode":{e[d.mode]},'
        f'"revision":{revision},"policy_source":{_jstr(d.policy_source)},'
        f'"latency_us":{float.__repr__(round(rec.duration_ns / 1000, 1))},'
        f'"trace_id":{_jstr(trace_id)}}}'
    )


def record_detail(rec: DecisionRecord) -> dict[str, Any]:
    """The admin API's view: the log fields plus what `explain` needs."""
    out = record_fields(rec)
    workload = rec.identity.workload if rec.identity else None
    out["workload"] = rec.decision.workload or None
    out["labels"] = dict(workload.labels) if workload else {}
    out["message"] = rec.decision.message
    out["allowed"] = rec.decision.allowed
    out["explanation"] = [
        {"rule": c.rule, "matched": c.matched, "why": c.why, "owner": c.owner}
        for c in bound_explanation(rec.decision.explanation)
    ]
    return out


_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def detail_json(rec: DecisionRecord) -> str:
    """`record_detail(rec)` as compact JSON (ensure_ascii off), built on `log_line`:
    the admin endpoint sends thousands of these, and this costs a third of
    `json.dumps(record_detail(rec))` (a test holds the two together)."""
    d = rec.decision
    workload = rec.identity.workload if rec.identity else None
    labels = _COMPACT.encode(dict(workload.labels)) if workload and workload.labels else "{}"
    checks = bound_explanation(d.explanation)
    explanation = ",".join(
        f'{{"rule":{_jstr(c.rule)},"matched":{"true" if c.matched else "false"},'
        f'"why":{_jstr(c.why)},"owner":{_jstr(c.owner)}}}'
        for c in checks
    )
    return (
        f"{log_line(rec, trace_id_of(rec.traceparent))[:-1]},"
        f'"workload":{_jstr(d.workload or None)},"labels":{labels},'
        f'"message":{_jstr(d.message)},"allowed":{"true" if d.allowed else "false"},'
        f'"explanation":[{explanation}]}}'
    )


# The decision log's longest line, in bytes: PIPE_BUF, so that every line is one
# atomic write(2) even when `--workers` processes share stdout. The field caps
# (authz.bounded) keep ordinary lines far below it; a line of escaped control
# characters or long policy names that still exceeds it is rendered again with
# every text field cut to TIGHT characters (24 x 6 bytes per escaped character
# x 20 text fields + keys < 4096).
LOG_LINE_MAX = 4096
TIGHT = 24


def fit_line(line: str, rec: DecisionRecord, trace_id: str | None) -> str:
    """`line` if it is within LOG_LINE_MAX bytes, else the same record with every
    text field cut to TIGHT characters."""
    # A character is at most 4 bytes of UTF-8: short lines need no encoding.
    if len(line) * 4 <= LOG_LINE_MAX or len(line.encode("utf-8", "replace")) <= LOG_LINE_MAX:
        return line
    fields = record_fields(rec, trace_id)
    for key, value in fields.items():
        if isinstance(value, str) and key != "time":
            fields[key] = cut(value, TIGHT)
    return _COMPACT.encode(fields)


# ---------------------------------------------------------------------------
# The recorder


class Spans(Protocol):
    """Where kept decisions become spans (authz.spans: in this process or a child)."""

    def emit(self, rec: DecisionRecord, fields: Mapping[str, Any], line: str) -> None:
        """One span; `fields` are the log fields (trace_id decided), `line` their JSON."""

    def end_batch(self) -> None:
        """The recorder drained its queue: push out anything buffered."""

    def flush(self, timeout: float = 5.0) -> bool: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...


def _NOT_EXPLAINED() -> tuple[RuleCheck, ...]:
    return (RuleCheck("...", False, "not explained: the recorder was behind"),)


def new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


class DecisionRecorder:
    """The Recorder `serve` plugs into the gRPC server.

    `spans` comes from `authz.spans.spans_from_env()`, or is None when no
    exporter is configured: then no span is ever built.
    """

    def __init__(
        self,
        settings: TracingSettings | None = None,
        *,
        spans: Spans | None = None,
        log_stream: IO[str] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings or TracingSettings()
        self.ring = RingBuffer(self.settings.ring_size)
        self._limits = self.settings.limits
        self._namespace_labels: set[str] = set()
        self.spans = spans
        self._log_stream = log_stream if log_stream is not None else sys.stdout
        self._rng = rng
        # A plain deque with a length check: cheaper than queue.Queue's lock and
        # condition, and record() must not wait for anything.
        # (record, its log line, whether it gets a span, the trace id the line names)
        self._pending: collections.deque[tuple[DecisionRecord, str, bool, str | None]] = (
            collections.deque()
        )
        # Records queued per source (authz.ring.source_of): once the queue is half
        # full, a source holding its share of the other half is refused, so that a
        # flood cannot crowd other namespaces out of the decision log and spans
        # (issue 12). Counted up by gRPC threads, down by the recorder thread.
        self._queued: dict[str, int] = {}
        self._queued_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the Check path ----------------------------------------------------

    def record(self, record: DecisionRecord) -> None:
        try:
            # Before anything is stored, counted or logged: every field a caller
            # controls is cut to its cap and query values are dropped.
            record = bound_record(record, self._limits)
            d = record.decision
            namespace = d.namespace
            if namespace not in self._namespace_labels:
                if len(self._namespace_labels) < self.settings.max_namespace_labels:
                    self._namespace_labels.add(namespace)
                else:
                    namespace = "_other"
            # The StrEnum members themselves: equal to and hashed like their values,
            # and `.value` costs half a microsecond each on this path.
            CHECKS.inc(d.verdict, d.reason, namespace)
            CHECK_SECONDS.observe(record.duration_ns / 1e9)
            source = source_of(record)
            self.ring.append(record, source)
            size = self.settings.queue_size
            pending = len(self._pending)
            if pending >= size or (
                pending >= size >> 1
                and self._queued.get(source, 0) >= (size >> 1) // (len(self._queued) or 1)
            ):
                TRACE_DROPPED.inc("queue" if pending >= size else "queue-share")
                if d.explainer is not None:
                    # Never explained now: let go of what the explainer holds (the
                    # request as sent, a policy snapshot) rather than keep it in the ring.
                    d.explainer = _NOT_EXPLAINED
                return
            span = self.spans is not None and self._keep_span(record)
            line = ""
            trace_id = None
            if span or self.settings.decision_log:
                trace_id = trace_id_of(record.traceparent)
                if span and trace_id is None:
                    # Chosen here, not by the SDK, so the log line names the
                    # trace its span lands in, wherever the span is built.
                    trace_id = new_trace_id()
                line = log_line(record, trace_id)
                if len(line) > 1024:
                    line = fit_line(line, record, trace_id)
            with self._queued_lock:  # counted before it can be taken: never below zero
                self._queued[source] = self._queued.get(source, 0) + 1
            self._pending.append((record, line, span, trace_id))
        except Exception:  # recording must never fail a Check
            TRACE_DROPPED.inc("error")

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> DecisionRecorder:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="egress-authz-recorder", daemon=True
            )
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Drain what is queued, flush spans, stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._drain()
        if self.spans is not None:
            self.spans.shutdown(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is logged and its spans exported (tests)."""
        deadline = time.monotonic() + timeout
        if self._thread is None:
            self._drain()
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(self.settings.flush_interval * 2)  # the batch in hand
        if self.spans is not None:
            return self.spans.flush(max(0.0, deadline - time.monotonic()))
        return not self._pending

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the background thread ----------------------------------------------

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self._drain()
            if stopping:
                return
            self._stop.wait(self.settings.flush_interval)

    def _drain(self) -> None:
        lines: list[str] = []
        log_on = self.settings.decision_log
        # Live readers get whole batches: one hand-over per batch and reader.
        streamed: list[DecisionRecord] | None = [] if self.ring.has_subscribers else None
        yielded = time.perf_counter()
        while True:
            try:
                rec, line, span, trace_id = self._pending.popleft()
            except IndexError:
                break
            source = source_of(rec)
            with self._queued_lock:
                left = self._queued.get(source, 1) - 1
                if left > 0:
                    self._queued[source] = left
                else:
                    self._queued.pop(source, None)
            if rec.decision.explainer is not None or span:
                try:
                    self._process(rec, line, span, trace_id)
                except Exception:
                    log.exception("recording decision %s failed", rec.decision.decision_id)
                    TRACE_DROPPED.inc("error")
                    continue
                # Explaining and span building hold the GIL for tens of µs a
                # record; hand it over every half millisecond, so that a gRPC
                # thread back from I/O does not wait out the interpreter's
                # switch interval behind a long batch (the convoy effect).
                # Allowed records with no span cost ~1 µs here and need no
                # hand-over (one per record cost ~50 µs of CPU per Check in
                # futex wake-ups and context switches).
                now = time.perf_counter()
                if now - yielded >= 0.0005:
                    time.sleep(0)
                    yielded = time.perf_counter()
            if streamed is not None:
                streamed.append(rec)
            if log_on:
                lines.append(line)
                if len(lines) >= 512:
                    self._write(lines)
                    lines = []
            if streamed is not None and len(streamed) >= 512:
                self.ring.publish(streamed)
                streamed = []
        self._write(lines)
        if streamed:
            self.ring.publish(streamed)
        if self.spans is not None:
            self.spans.end_batch()

    def _process(self, rec: DecisionRecord, line: str, span: bool, trace_id: str | None) -> None:
        d = rec.decision
        if d.explainer is not None:
            # The engine explains denials lazily; do it here, off the Check
            # path, bounded (authz.bounded), then swap the explainer for one
            # holding only the answer, so that the ring does not keep
            # superseded policy snapshots alive through its closure (and an
            # admin thread reading it meanwhile still finds a callable).
            # partial(tuple, t) returns t: smaller than a lambda and its cell.
            explanation = bound_explanation(d.explanation, self._limits)
            d._explanation = explanation
            d.explainer = functools.partial(tuple, explanation)
        if span and self.spans is not None:
            # The trace id the line names (chosen in record()) is the span's.
            self.spans.emit(rec, record_fields(rec, trace_id), line)

    def _keep_span(self, rec: DecisionRecord) -> bool:
        if rec.decision.verdict is not Verdict.ALLOW:
            return True  # denials and audit verdicts are what people come to read
        if _sampled(rec.traceparent):
            return True  # the caller records this trace: leaving our span out breaks it
        ratio = self.settings.allow_ratio
        return ratio >= 1.0 or (ratio > 0.0 and self._rng() < ratio)

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        try:
            fd = self._log_stream.fileno()
        except (OSError, ValueError, AttributeError):
            fd = -1  # not a real file (tests): its write() is all there is
        try:
            if fd < 0:
                self._log_stream.write(text)
                self._log_stream.flush()
            else:
                self._log_stream.flush()
                _write_whole_lines(fd, text.encode("utf-8", "replace"))
        except (OSError, ValueError):
            # A closed or broken stdout must not stop spans and the ring.
            TRACE_DROPPED.inc("log", amount=float(len(lines)))


_PIPE_BUF = 4096


def _write_whole_lines(fd: int, data: bytes) -> None:
    """Write newline-terminated `data` to `fd` in chunks of whole lines of at
    most PIPE_BUF bytes.

    Under `serve --workers N` every worker writes its decision log to the same
    stdout pipe; the kernel keeps writes of up to PIPE_BUF bytes whole, so no
    worker's line is ever cut by another's. (A single line longer than that,
    a rare huge path, is written alone and may be interleaved.)
    """
    view = memoryview(data)
    start, size = 0, len(data)
    while start < size:
        end = start + _PIPE_BUF
        if end >= size:
            end = size
        else:
            cut = data.rfind(b"\n", start, end)
            # No newline within PIPE_BUF: one long line, written alone.
            end = cut + 1 if cut >= 0 else data.index(b"\n", end) + 1
        _write_all(fd, view[start:end])
        start = end


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
