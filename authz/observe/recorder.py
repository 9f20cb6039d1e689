"""Recording of decisions, after the answer and off the Check path.

The gRPC server hands each DecisionRecord to `DecisionRecorder.submit()`,
which appends it to an inbox (a deque append: the only recording work on the
Check path). Two background threads take it from there:

- the intake thread wakes every `flush_interval`, takes the whole inbox and
  runs `record()` on each record in one warm pass: bounding, metrics (added
  up per batch), the ring buffer the admin endpoint reads, the decision-log
  line, one append to the bounded log/span queue (fair shares per source);
- the log thread explains denials, writes the JSON-lines decision log and
  hands kept decisions to a span sink (authz/observe/spans.py:
  OpenTelemetry, configured by the standard OTEL_* variables).

Why hand over whole batches: the same `record()` that costs ~7 µs in a loop
cost the event loop ~40 µs per Check when run between two answers (its code
and data cold after grpcio's own), and a hand-over per record costs a GIL
switch and futex wake-ups (~50 µs of CPU per Check, measured in the
threaded server): docs/benchmarks.md, "Recording off the Check path". The
threads wake on a timer, never per record. The intake thread does no I/O,
so a stalled stdout or collector never stops metrics or the ring. Full
queues drop and count in `egress_authz_trace_records_dropped_total`;
nothing here waits for a reader or a collector.
"""

from __future__ import annotations

import collections
import functools
import logging
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

from ..model import RuleCheck, Verdict
from ..records import DecisionRecord
from .bounded import DEFAULT_LIMITS, RecordLimits, bound_explanation, bound_record
from .decisionlog import _sampled, fit_line, log_line, record_fields, trace_id_of, write_whole_lines
from .metrics import METRICS, Metrics
from .ring import RingBuffer, source_of

log = logging.getLogger(__name__)


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
    """Size caps of recorded fields, and whether query values are kept (authz.observe.bounded)."""
    max_namespace_labels: int = 1000
    """Distinct `namespace` label values on the checks counter; later ones count as
    `_other` (principals can be forged: the metric must not grow without end)."""


# ---------------------------------------------------------------------------
# The recorder


class Spans(Protocol):
    """Where kept decisions become spans (authz.observe.spans: in this process or a child)."""

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

    `spans` comes from `authz.observe.spans.spans_from_env()`, or is None when no
    exporter is configured: then no span is ever built.
    """

    def __init__(
        self,
        settings: TracingSettings | None = None,
        *,
        spans: Spans | None = None,
        log_stream: IO[str] | None = None,
        rng: Callable[[], float] = random.random,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or TracingSettings()
        self.metrics = metrics = metrics or METRICS
        self._dropped = metrics.trace_dropped
        self._observe = metrics.check_seconds.observe
        # The counter's children by label values: labels() validates and locks
        # on every call, a dict lookup does not (this is the Check path).
        self._check_counters: dict[tuple[str, str, str], Any] = {}
        self.ring = RingBuffer(self.settings.ring_size, metrics=metrics)
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
        # Records queued per source (authz.observe.ring.source_of): once the queue is
        # half full, a source holding its share of the other half is refused, so that a
        # flood cannot crowd other namespaces out of the decision log and spans
        # (issue 12). Counted up by gRPC threads, down by the recorder thread.
        self._queued: dict[str, int] = {}
        self._queued_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # submit()'s inbox, emptied whole by the intake thread every flush_interval.
        # Bounded as a memory safety valve only: the intake does no I/O, so it
        # falls behind only when the process is starved of CPU for seconds.
        self._inbox: collections.deque[DecisionRecord] = collections.deque()
        self._inbox_size = max(self.settings.queue_size, 10_000)
        self._intake_stop = threading.Event()
        self._intake_thread: threading.Thread | None = None
        # Under --workers: hands each drained batch to the supervisor's ring
        # (authz.pooled.RecordForwarder), after explaining, never waiting.
        self.forward: Callable[[Sequence[DecisionRecord]], None] | None = None

    # -- the Check path ----------------------------------------------------

    def submit(self, record: DecisionRecord) -> None:
        """Take `record` for recording soon (by the intake thread, `record()`);
        the Check path's whole share of recording. Never waits, never raises."""
        inbox = self._inbox
        if len(inbox) < self._inbox_size:
            inbox.append(record)
        else:
            self._dropped.labels("intake").inc()

    # -- the intake thread (or a caller without threads) ------------------

    def record(self, record: DecisionRecord) -> None:
        """Bound, count, keep in the ring and queue for the log thread, now."""
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
            key = (d.verdict, d.reason, namespace)
            counter = self._check_counters.get(key)
            if counter is None:
                counter = self._check_counters[key] = self.metrics.checks.labels(*key)
            counter.inc()
            self._observe(record.duration_ns / 1e9)
            source = source_of(record)
            self.ring.append(record, source)
            size = self.settings.queue_size
            pending = len(self._pending)
            if pending >= size or (
                pending >= size >> 1
                and self._queued.get(source, 0) >= (size >> 1) // (len(self._queued) or 1)
            ):
                self._dropped.labels("queue" if pending >= size else "queue-share").inc()
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
            self._dropped.labels("error").inc()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> DecisionRecorder:
        if self._intake_thread is None:
            self._intake_thread = threading.Thread(
                target=self._intake_run, name="egress-authz-intake", daemon=True
            )
            self._intake_thread.start()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="egress-authz-recorder", daemon=True
            )
            self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Drain what is queued, then flush spans and stop the span sink.

        `timeout` bounds the drain; the span sink has its own (a child
        exporter gets spans.FLUSH_TIMEOUT to send what it holds)."""
        self._intake_stop.set()
        if self._intake_thread is not None:
            self._intake_thread.join(timeout)
            self._intake_thread = None
        self._intake()  # whatever came after the thread's last pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self._drain()
        if self.spans is not None:
            self.spans.shutdown()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is logged and its spans exported (tests)."""
        deadline = time.monotonic() + timeout
        if self._intake_thread is None:
            self._intake()
        while self._inbox and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(self.settings.flush_interval * 2)  # the intake batch in hand
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

    # -- the intake thread ---------------------------------------------------

    def _intake_run(self) -> None:
        while not self._intake_stop.wait(self.settings.flush_interval):
            self._intake()

    def _intake(self) -> None:
        """record() every record submitted so far, oldest first, in one pass.

        The GIL is handed over every half millisecond of work (as in _drain),
        so that a Check waiting for it does not sit out the interpreter's
        switch interval behind a long batch."""
        inbox, record = self._inbox, self.record
        yielded = time.perf_counter()
        n = 0
        while True:
            try:
                rec = inbox.popleft()
            except IndexError:
                return
            record(rec)
            n += 1
            if n & 31 == 0:
                now = time.perf_counter()
                if now - yielded >= 0.0005:
                    time.sleep(0)
                    yielded = time.perf_counter()

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
        forward = self.forward
        forwarded: list[DecisionRecord] | None = [] if forward is not None else None
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
                    self._dropped.labels("error").inc()
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
            if forwarded is not None:
                forwarded.append(rec)
                if len(forwarded) >= 256 and forward is not None:
                    forward(forwarded)
                    forwarded = []
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
        if forwarded and forward is not None:
            forward(forwarded)
        if self.spans is not None:
            self.spans.end_batch()

    def _process(self, rec: DecisionRecord, line: str, span: bool, trace_id: str | None) -> None:
        d = rec.decision
        if d.explainer is not None:
            # The engine explains denials lazily; do it here, off the Check
            # path, bounded (authz.observe.bounded), then swap the explainer for one
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
                write_whole_lines(fd, text.encode("utf-8", "replace"))
        except (OSError, ValueError):
            # A closed or broken stdout must not stop spans and the ring.
            self._dropped.labels("log").inc(len(lines))
