"""authz.observe (recorder, decision log, spans): decision log, ring buffer, metrics and OpenTelemetry spans."""

from __future__ import annotations

import io
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from authz.model import (
    Decision,
    Destination,
    Identity,
    Mode,
    Protocol,
    Reason,
    RuleCheck,
    Verdict,
    Workload,
)
from authz.observe.decisionlog import (
    LOG_FIELDS,
    log_line,
    record_detail,
    record_fields,
    trace_id_of,
)
from authz.observe.metrics import Metrics
from authz.observe.recorder import DecisionRecorder, TracingSettings
from authz.observe.ring import RingBuffer
from authz.observe.spans import SPAN_NAME, TracingConfigError, exporters_from_env, span_sink
from authz.records import DecisionRecord

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"
_ids = itertools.count(1)


def dropped(sink: str, metrics: Metrics) -> float:
    """Records dropped at `sink` as `metrics` (a test's own registry) counts them."""
    return metrics.value("egress_authz_trace_records_dropped_total", {"sink": sink})


def make_record(
    *,
    verdict: Verdict = Verdict.DENY,
    reason: Reason | None = None,
    namespace: str = "shop",
    account: str = "cart",
    pod: str = "cart-7d9f",
    labels: dict[str, str] | None = None,
    source_ip: str = "10.0.0.12",
    host: str = "api.leng.com",
    port: int = 443,
    protocol: Protocol = Protocol.TLS,
    method: str | None = None,
    path: str | None = None,
    traceparent: str | None = None,
    tracestate: str | None = None,
    start_unix_ns: int | None = None,
    duration_ns: int = 85_000,
    mode: Mode = Mode.ENFORCE,
    decision_id: str | None = None,
    rule: str | None = None,
    explanation: Sequence[RuleCheck] | None = None,
    policy_source: str | None = "shop/egress-policy",
) -> DecisionRecord:
    """A record as the gRPC server would build it (decisions as the engine makes them)."""
    if reason is None:
        reason = Reason.ALLOWED if verdict is Verdict.ALLOW else Reason.HOST_NOT_ALLOWED
    if explanation is None:
        explanation = (
            ()
            if verdict is Verdict.ALLOW
            else (
                RuleCheck(
                    "shop/egress-policy/kadath-api",
                    False,
                    f"host {host} is not in hosts [api.kadath.io]",
                    "team-integrations",
                ),
            )
        )
    decision = Decision(
        allowed=verdict is not Verdict.DENY,
        verdict=verdict,
        reason=reason,
        decision_id=decision_id or f"d{next(_ids):06d}",
        revision=7,
        rule=rule or ("shop/egress-policy/kadath-api" if verdict is Verdict.ALLOW else None),
        owner="team-integrations" if verdict is Verdict.ALLOW else None,
        host=host,
        namespace=namespace,
        service_account=account,
        mode=mode,
        message="" if verdict is Verdict.ALLOW else f"no rule allows {namespace}/{account}",
        explainer=(lambda: tuple(explanation)) if explanation else None,
        policy_source=policy_source,
    )
    identity = Identity(
        principal=f"spiffe://cluster.local/ns/{namespace}/sa/{account}",
        source_ip=source_ip,
        workload=Workload(namespace, account, labels or {"app": account}, pod, source_ip),
    )
    destination = Destination(
        port=port,
        protocol=protocol,
        sni=host if protocol is Protocol.TLS else None,
        http_host=host if protocol is Protocol.HTTP else None,
        method=method,
        path=path,
    )
    return DecisionRecord(
        decision=decision,
        identity=identity,
        destination=destination,
        start_unix_ns=start_unix_ns if start_unix_ns is not None else time.time_ns(),
        duration_ns=duration_ns,
        traceparent=traceparent,
        tracestate=tracestate,
        filter="http" if protocol is Protocol.HTTP else "network",
    )


def recorder_with_spans(
    settings: TracingSettings | None = None, exporter: SpanExporter | None = None, **kw: Any
) -> tuple[DecisionRecorder, InMemorySpanExporter | SpanExporter, io.StringIO]:
    exporter = exporter or InMemorySpanExporter()
    log = io.StringIO()
    rec = DecisionRecorder(
        settings or TracingSettings(flush_interval=0.01),
        spans=span_sink([exporter], {}, schedule_delay_millis=10, **kw),
        log_stream=log,
    )
    return rec.start(), exporter, log


class TestRecordFields:
    def test_every_log_field_present_in_order(self) -> None:
        """A log line carries every documented field, in the documented order."""
        fields = record_fields(make_record())
        assert tuple(fields) == LOG_FIELDS

    def test_values_as_seen(self) -> None:
        """Fields come from the decision, the identity as seen and the destination as seen."""
        f = record_fields(
            make_record(
                protocol=Protocol.HTTP, port=80, method="POST", path="/v1/x", duration_ns=123_456
            )
        )
        assert f["verdict"] == "deny" and f["reason"] == "host-not-allowed"
        assert (f["namespace"], f["service_account"], f["pod"]) == ("shop", "cart", "cart-7d9f")
        assert (f["host"], f["port"], f["http_host"], f["sni"]) == (
            "api.leng.com",
            80,
            "api.leng.com",
            None,
        )
        assert (f["method"], f["path"], f["protocol"], f["filter"]) == (
            "POST",
            "/v1/x",
            "HTTP",
            "http",
        )
        assert f["latency_us"] == 123.5
        assert f["time"].endswith("Z") and "T" in f["time"]

    def test_unparsed_request(self) -> None:
        """A record without identity or destination (bad request) still serialises."""
        rec = make_record(reason=Reason.BAD_REQUEST)
        bare = DecisionRecord(rec.decision, None, None, rec.start_unix_ns, 10)
        f = record_fields(bare)
        assert f["source_ip"] is None and f["port"] is None and f["reason"] == "bad-request"
        json.dumps(record_detail(bare))

    @pytest.mark.parametrize(
        "rec",
        [
            make_record(),
            make_record(verdict=Verdict.ALLOW, protocol=Protocol.HTTP, method="GET", path="/"),
            make_record(traceparent=TRACEPARENT, duration_ns=1, mode=Mode.AUDIT),
            make_record(
                protocol=Protocol.HTTP,
                method='P"O\\ST',
                path='/\u00e9\u4e2d/\x00\x1f\n\t\u2028\U0001f600?q="x"',
                host="h\u00f6st.example",
                pod="",
                source_ip="",
                namespace="",
                account="",
                policy_source=None,
                port=0,
                duration_ns=10**12 + 49,
            ),
            DecisionRecord(make_record().decision, None, None, 0, 0),
            DecisionRecord(
                make_record().decision,
                Identity(principal=""),
                Destination(port=443, protocol=Protocol.TLS),
                1_700_000_000_999_999_999,
                987_654_321,
                filter="",
            ),
        ],
    )
    @pytest.mark.parametrize("trace_id", [None, TRACE_ID])
    def test_log_line_is_json_dumps_of_fields(
        self, rec: DecisionRecord, trace_id: str | None
    ) -> None:
        """The hand-rendered line is exactly json.dumps of record_fields (the contract)."""
        expected = json.dumps(
            record_fields(rec, trace_id), separators=(",", ":"), ensure_ascii=False
        )
        line = log_line(rec, trace_id or trace_id_of(rec.traceparent))
        assert line == expected
        assert tuple(json.loads(line)) == LOG_FIELDS

    def test_log_line_memo_is_bounded_and_exact(self) -> None:
        """The memo of encoded field values stays within its size under hostile variety,
        keeps no long value, and lines stay json.dumps-exact through its resets."""
        import authz.observe.decisionlog as tracing

        memo = tracing._jstr.__self__  # type: ignore[attr-defined]
        for i in range(3 * tracing._MEMO_SIZE):
            rec = make_record(host=f"h{i}\x01.example", pod=f"p\"{i}", path=f"/{i}")
            expected = json.dumps(record_fields(rec), separators=(",", ":"), ensure_ascii=False)
            assert log_line(rec, None) == expected
            assert len(memo) <= tracing._MEMO_SIZE
        long = "x" * (tracing._MEMO_CHARS + 1)
        assert json.loads(log_line(make_record(host=long), None))["host"] == long
        assert long not in memo

    @pytest.mark.parametrize(
        "header, expected",
        [
            (TRACEPARENT, TRACE_ID),
            (TRACEPARENT.upper().replace("00-", "00-", 1), TRACE_ID),
            ("00-" + "0" * 32 + "-b7ad6b7169203331-01", None),
            ("garbage", None),
            ("00-xyz-b7ad6b7169203331-01", None),
            (None, None),
        ],
    )
    def test_trace_id_of(self, header: str | None, expected: str | None) -> None:
        """Only a well-formed, non-zero W3C trace id is taken from traceparent."""
        assert trace_id_of(header) == expected


class TestRingBuffer:
    def test_bounded_newest_kept(self) -> None:
        """The ring keeps the last N records and evicts the oldest."""
        ring = RingBuffer(3)
        recs = [make_record() for _ in range(5)]
        for r in recs:
            ring.append(r)
        assert ring.snapshot() == recs[2:]
        assert ring.find(recs[4].decision.decision_id) is recs[4]
        assert ring.find(recs[0].decision.decision_id) is None

    def test_slow_subscriber_loses_records_not_time(self) -> None:
        """A full subscriber queue drops and counts; publishing never waits."""
        metrics = Metrics()
        ring = RingBuffer(10, metrics=metrics)
        sub = ring.subscribe(size=2)
        for _ in range(5):
            ring.publish([make_record()])
        assert sub.qsize() == 2 and sub.dropped == 3
        assert dropped("stream", metrics) == 3
        ring.unsubscribe(sub)
        ring.publish([make_record()])
        assert sub.qsize() == 2


class TestDecisionRecorder:
    def test_log_line_per_decision(self) -> None:
        """Each record becomes one JSON line on the log stream, in order."""
        log = io.StringIO()
        recorder = DecisionRecorder(TracingSettings(flush_interval=0.01), log_stream=log).start()
        recs = [make_record(verdict=v) for v in (Verdict.ALLOW, Verdict.DENY, Verdict.AUDIT)]
        for r in recs:
            recorder.record(r)
        recorder.close()
        lines = [json.loads(x) for x in log.getvalue().splitlines()]
        assert [x["decision_id"] for x in lines] == [r.decision.decision_id for r in recs]
        assert [x["verdict"] for x in lines] == ["allow", "deny", "audit"]
        assert all(x["trace_id"] is None for x in lines)  # no span, no traceparent

    def test_explains_off_the_check_path(self) -> None:
        """A denial is explained on the recorder's thread, which then drops the engine's
        explainer (so the ring keeps no old policy snapshot alive)."""
        threads: list[str] = []
        check = RuleCheck("shop/egress-policy/x", False, "because")

        def explainer() -> tuple[RuleCheck, ...]:
            threads.append(threading.current_thread().name)
            return (check,)

        r = make_record()
        r.decision.explainer = explainer
        recorder = DecisionRecorder(log_stream=io.StringIO()).start()
        recorder.record(r)
        assert threads == []  # record() itself never explains
        recorder.close()
        assert threads == ["egress-authz-recorder"]
        assert r.decision.explanation == (check,)
        assert r.decision.explainer is not explainer and r.decision.explainer is not None
        assert r.decision.explainer() == (check,)
        assert threads == ["egress-authz-recorder"]  # not explained again

    def test_workers_sharing_stdout_never_cut_lines(self) -> None:
        """Two recorders (as two --workers) writing to one pipe: every line arrives whole."""
        import os

        read_fd, write_fd = os.pipe()
        # One file object per "worker", each with its own buffer, like processes.
        outs = [open(os.dup(write_fd), "w") for _ in range(2)]  # noqa: SIM115 - closed below
        os.close(write_fd)
        received = bytearray()

        def reader() -> None:
            with open(read_fd, "rb") as f:
                while chunk := f.read(1024):  # small reads: the writer waits at times
                    received.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        recorders = [
            DecisionRecorder(TracingSettings(flush_interval=0.001), log_stream=out).start()
            for out in outs
        ]
        for i in range(3000):
            recorders[i % 2].record(make_record(path="/p/" + "x" * (i % 300)))
        for r in recorders:
            r.close()
        for out in outs:
            out.close()
        t.join(10)
        lines = received.decode().splitlines()
        assert len(lines) == 3000
        assert all(json.loads(line)["decision_id"] for line in lines)

    def test_log_off(self) -> None:
        """decision_log=False writes nothing but still fills the ring."""
        log = io.StringIO()
        recorder = DecisionRecorder(TracingSettings(decision_log=False), log_stream=log)
        recorder.record(make_record())
        recorder.close()
        assert log.getvalue() == "" and len(recorder.ring) == 1

    def test_metrics(self) -> None:
        """CHECKS counts by verdict, reason and namespace; CHECK_SECONDS observes latency."""
        metrics = Metrics()
        recorder = DecisionRecorder(log_stream=io.StringIO(), metrics=metrics)
        recorder.record(make_record(reason=Reason.PORT_NOT_ALLOWED, namespace="metrics-ns"))
        recorder.record(make_record(reason=Reason.PORT_NOT_ALLOWED, namespace="metrics-ns"))
        labels = {"verdict": "deny", "reason": "port-not-allowed", "namespace": "metrics-ns"}
        assert metrics.value("egress_authz_checks_total", labels) == 2
        assert metrics.value("egress_authz_check_duration_seconds_count") == 2
        recorder.close()

    def test_never_raises(self) -> None:
        """A record that cannot be read is counted, not raised into the Check path."""
        metrics = Metrics()
        recorder = DecisionRecorder(log_stream=io.StringIO(), metrics=metrics)
        recorder.record(object())  # type: ignore[arg-type]
        assert dropped("error", metrics) == 1
        recorder.close()

    def test_broken_log_stream(self) -> None:
        """A closed stdout loses log lines (counted); the ring still fills."""
        log = io.StringIO()
        log.close()
        metrics = Metrics()
        recorder = DecisionRecorder(log_stream=log, metrics=metrics)
        recorder.record(make_record())
        recorder.close()
        assert dropped("log", metrics) == 1 and len(recorder.ring) == 1


class TestSpans:
    def test_span_from_record(self) -> None:
        """One SERVER span named egress-authz.check, timed from the record, with attributes."""
        recorder, exporter, log = recorder_with_spans()
        r = make_record(start_unix_ns=1_700_000_000_000_000_000, duration_ns=250_000)
        recorder.record(r)
        recorder.close()
        assert isinstance(exporter, InMemorySpanExporter)
        (span,) = exporter.get_finished_spans()
        assert span.name == SPAN_NAME and span.kind is SpanKind.SERVER
        assert span.start_time == r.start_unix_ns
        assert span.end_time == r.start_unix_ns + 250_000
        attrs = dict(span.attributes or {})
        assert attrs["egress_authz.decision_id"] == r.decision.decision_id
        assert attrs["egress_authz.verdict"] == "deny"
        assert attrs["egress_authz.reason"] == "host-not-allowed"
        assert attrs["egress_authz.namespace"] == "shop"
        assert attrs["egress_authz.service_account"] == "cart"
        assert attrs["egress_authz.pod"] == "cart-7d9f"
        assert attrs["egress_authz.source_ip"] == "10.0.0.12"
        assert attrs["egress_authz.host"] == "api.leng.com"
        assert attrs["egress_authz.port"] == 443
        assert attrs["egress_authz.sni"] == "api.leng.com"
        assert attrs["egress_authz.revision"] == 7
        assert attrs["egress_authz.mode"] == "enforce"
        assert attrs["egress_authz.allowed"] is False
        assert attrs["rpc.system"] == "grpc" and attrs["rpc.method"] == "Check"
        assert "egress_authz.http_host" not in attrs  # null values are left out
        assert span.resource.attributes["service.name"] == "egress-authz"
        line = json.loads(log.getvalue())
        assert line["trace_id"] == format(span.context.trace_id, "032x")

    def test_parent_from_traceparent(self) -> None:
        """A W3C traceparent makes the span a child in the caller's trace."""
        recorder, exporter, log = recorder_with_spans()
        recorder.record(make_record(traceparent=TRACEPARENT, tracestate="vendor=abc"))
        recorder.close()
        assert isinstance(exporter, InMemorySpanExporter)
        (span,) = exporter.get_finished_spans()
        assert format(span.context.trace_id, "032x") == TRACE_ID
        assert span.parent is not None and span.parent.is_remote
        assert format(span.parent.span_id, "016x") == PARENT_SPAN
        assert span.context.trace_state.get("vendor") == "abc"
        assert json.loads(log.getvalue())["trace_id"] == TRACE_ID

    def test_unsampled_parent_still_records_denial(self) -> None:
        """A caller that did not sample its trace does not hide our denials."""
        recorder, exporter, _ = recorder_with_spans()
        recorder.record(make_record(traceparent=f"00-{TRACE_ID}-{PARENT_SPAN}-00"))
        recorder.close()
        assert isinstance(exporter, InMemorySpanExporter)
        assert len(exporter.get_finished_spans()) == 1

    def test_bad_traceparent_gives_root(self) -> None:
        """A malformed traceparent is ignored: the span starts its own trace."""
        recorder, exporter, _ = recorder_with_spans()
        recorder.record(make_record(traceparent="00-nothex-zz-01"))
        recorder.close()
        assert isinstance(exporter, InMemorySpanExporter)
        (span,) = exporter.get_finished_spans()
        assert span.parent is None

    def test_allows_sampled_denials_kept(self) -> None:
        """allow_ratio=0 drops allow spans; deny and audit spans are always made."""
        recorder, exporter, log = recorder_with_spans(
            TracingSettings(allow_ratio=0.0, flush_interval=0.01)
        )
        for v in (Verdict.ALLOW, Verdict.ALLOW, Verdict.DENY, Verdict.AUDIT):
            recorder.record(make_record(verdict=v))
        recorder.close()
        assert isinstance(exporter, InMemorySpanExporter)
        verdicts = sorted(
            str((s.attributes or {})["egress_authz.verdict"]) for s in exporter.get_finished_spans()
        )
        assert verdicts == ["audit", "deny"]
        assert len(log.getvalue().splitlines()) == 4  # the log keeps every decision

    def test_sampled_caller_keeps_allow(self) -> None:
        """An allow is traced whatever the ratio when the caller's trace is sampled."""
        recorder, exporter, _ = recorder_with_spans(
            TracingSettings(allow_ratio=0.0, flush_interval=0.01)
        )
        recorder.record(make_record(verdict=Verdict.ALLOW, traceparent=TRACEPARENT))
        unsampled = f"00-{TRACE_ID}-{PARENT_SPAN}-00"
        recorder.record(make_record(verdict=Verdict.ALLOW, traceparent=unsampled))
        recorder.close()
        assert isinstance(exporter, InMemorySpanExporter)
        assert len(exporter.get_finished_spans()) == 1

    def test_allow_ratio(self) -> None:
        """A ratio keeps that share of allows (rng decides)."""
        exporter = InMemorySpanExporter()
        values = itertools.cycle([0.1, 0.6, 0.3, 0.9])
        recorder = DecisionRecorder(
            TracingSettings(allow_ratio=0.5),
            spans=span_sink([exporter], {}),
            log_stream=io.StringIO(),
            rng=lambda: next(values),
        )
        for _ in range(8):
            recorder.record(make_record(verdict=Verdict.ALLOW))
        recorder.close()
        assert len(exporter.get_finished_spans()) == 4


class _Stalled(SpanExporter):
    """An exporter stuck like a collector that stopped reading."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.release.wait(120)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def _queue_drops(metrics: Metrics) -> float:
    """Records dropped before the recorder's queue: full, or over their source's share."""
    return dropped("queue", metrics) + dropped("queue-share", metrics)


def _returns_within(fn: Callable[[], None], timeout: float) -> bool:
    """Run `fn` in a thread; whether it returned within `timeout` seconds."""
    done = threading.Event()

    def run() -> None:
        fn()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done.wait(timeout)


class _StalledStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait(120)
        return len(s)


class TestBackpressure:
    def test_stalled_exporter_and_stdout(self) -> None:
        """A flood with a stuck collector and a stuck stdout: record() stays fast,
        queues and ring stay within their bounds, and the drops are counted."""
        exporter = _Stalled()
        log = _StalledStream()
        settings = TracingSettings(ring_size=1000, queue_size=500, flush_interval=0.001)
        recorder = DecisionRecorder(
            settings,
            spans=span_sink([exporter], {}, max_queue_size=256, schedule_delay_millis=1),
            log_stream=log,
            metrics=(metrics := Metrics()),
        ).start()
        r = make_record()

        def flood() -> None:
            for _ in range(20_000):
                recorder.record(r)

        # The sinks stay stalled until released below: a record() that waited on
        # either would never return (the bound only keeps the test from hanging).
        assert _returns_within(flood, 60), "record() waited on a stalled sink"
        assert not log.release.is_set() and not exporter.release.is_set()
        assert recorder.pending <= settings.queue_size
        assert len(recorder.ring) == settings.ring_size
        assert dropped("queue", metrics) + dropped("queue-share", metrics) >= (
            20_000 - settings.queue_size - 600
        )
        log.release.set()
        exporter.release.set()
        recorder.close()

    def test_stalled_exporter_drops_spans(self) -> None:
        """With stdout fine and the collector stuck, spans beyond the batch queue are
        dropped and counted under sink="span"."""
        exporter = _Stalled()
        recorder = DecisionRecorder(
            TracingSettings(flush_interval=0.001),
            spans=span_sink(
                [exporter], {}, max_queue_size=64, schedule_delay_millis=1,
                metrics=(metrics := Metrics()),
            ),
            log_stream=io.StringIO(),
        ).start()
        for _ in range(2000):
            recorder.record(make_record())
        deadline = time.monotonic() + 10
        while recorder.pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dropped("span", metrics) > 1000
        exporter.release.set()
        recorder.close()


class TestExportersFromEnv:
    def test_nothing_configured_means_no_tracing(self) -> None:
        """With no OTEL_* settings, no exporter and so no span is ever built."""
        assert exporters_from_env({}) == []
        assert span_sink([], {}) is None

    @pytest.mark.parametrize(
        "env",
        [
            {"OTEL_TRACES_EXPORTER": "none"},
            {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"},
        ],
    )
    def test_explicitly_off(self, env: dict[str, str]) -> None:
        """OTEL_TRACES_EXPORTER=none and OTEL_SDK_DISABLED turn tracing off."""
        assert exporters_from_env(env) == []

    def test_endpoint_means_otlp_grpc(self) -> None:
        """An OTLP endpoint alone selects the OTLP exporter over gRPC."""
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        (exporter,) = exporters_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
        assert isinstance(exporter, OTLPSpanExporter)
        exporter.shutdown()

    def test_http_protobuf(self) -> None:
        """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf selects the OTLP/HTTP exporter."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        (exporter,) = exporters_from_env(env)
        assert isinstance(exporter, OTLPSpanExporter)

    def test_console_writes_to_stderr(self) -> None:
        """The console exporter is allowed; it must not share stdout with the log."""
        import sys

        (exporter,) = exporters_from_env({"OTEL_TRACES_EXPORTER": "console"})
        assert exporter.out is sys.stderr  # type: ignore[attr-defined]

    @pytest.mark.parametrize(
        "env",
        [
            {"OTEL_TRACES_EXPORTER": "zipkin"},
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        ],
    )
    def test_unsupported_is_an_error(self, env: dict[str, str]) -> None:
        """An exporter this service cannot provide fails startup with a clear message."""
        with pytest.raises(TracingConfigError, match="not supported"):
            exporters_from_env(env)

    def test_service_name_from_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """OTEL_SERVICE_NAME overrides the default service.name."""
        monkeypatch.setenv("OTEL_SERVICE_NAME", "egress-gw-authz")
        sink = span_sink([InMemorySpanExporter()], {})
        assert sink is not None
        assert sink.provider.resource.attributes["service.name"] == "egress-gw-authz"
        sink.shutdown()


class CollectorStub:
    """An OTLP/gRPC collector on 127.0.0.1 that keeps what it is sent."""

    def __init__(self) -> None:
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.spans: list[Any] = []  # opentelemetry.proto.trace.v1.Span
        self.resources: list[Any] = []
        self._lock = threading.Lock()

        def export(data: bytes, context: object) -> bytes:
            req = ExportTraceServiceRequest.FromString(data)
            with self._lock:
                for rs in req.resource_spans:
                    self.resources.append(rs.resource)
                    for ss in rs.scope_spans:
                        self.spans.extend(ss.spans)
            return b""  # ExportTraceServiceResponse{}: all accepted

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def env(self) -> dict[str, str]:
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "egress-authz-test",
        }

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.spans) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.spans)

    def stop(self) -> None:
        self.server.stop(0)


def _attrs(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


class TestSpanPipe:
    def test_child_exports_spans_over_otlp(self) -> None:
        """serve's path: spans go through the child process to an OTLP/gRPC collector,
        with the caller's trace as parent and the log line's trace id."""
        import os

        from authz.observe.spans import SpanPipe

        stub = CollectorStub()
        log = io.StringIO()
        try:
            pipe = SpanPipe({**os.environ, **stub.env})
            recorder = DecisionRecorder(
                TracingSettings(allow_ratio=1.0, flush_interval=0.01), spans=pipe, log_stream=log
            ).start()
            child = make_record(traceparent=TRACEPARENT, start_unix_ns=1_700_000_000 * 10**9)
            root = make_record(verdict=Verdict.ALLOW)
            recorder.record(child)
            recorder.record(root)
            recorder.close()  # closes the pipe: the child flushes and exits
            spans = stub.wait_for(2)
        finally:
            stub.stop()
        assert pipe.proc.returncode == 0
        assert len(spans) == 2
        by_id = {_attrs(s)["egress_authz.decision_id"]: s for s in spans}
        s = by_id[child.decision.decision_id]
        assert s.name == SPAN_NAME and s.kind == 2  # SPAN_KIND_SERVER
        assert s.trace_id.hex() == TRACE_ID and s.parent_span_id.hex() == PARENT_SPAN
        assert s.start_time_unix_nano == 1_700_000_000 * 10**9
        assert s.end_time_unix_nano - s.start_time_unix_nano == child.duration_ns
        assert _attrs(s)["egress_authz.verdict"] == "deny"
        lines = {json.loads(x)["decision_id"]: json.loads(x) for x in log.getvalue().splitlines()}
        r = by_id[root.decision.decision_id]
        assert r.parent_span_id == b""
        assert r.trace_id.hex() == lines[root.decision.decision_id]["trace_id"]
        names = [
            kv.value.string_value
            for res in stub.resources
            for kv in res.attributes
            if kv.key == "service.name"
        ]
        assert set(names) == {"egress-authz-test"}

    def test_stalled_child_drops_never_blocks(self) -> None:
        """With the exporter process frozen, record() never waits for it: a flood
        returns while the child is still stopped, and the spans that do not fit in
        the pipe are dropped and counted."""
        import os
        import signal

        from authz.observe.spans import SpanPipe

        stub = CollectorStub()
        metrics = Metrics()  # the pipe's and the recorder's drops, and nothing else's
        pipe = SpanPipe({**os.environ, **stub.env}, metrics)
        os.kill(pipe.proc.pid, signal.SIGSTOP)
        try:
            recorder = DecisionRecorder(
                TracingSettings(flush_interval=0.001, queue_size=1000),
                spans=pipe,
                log_stream=io.StringIO(),
                metrics=metrics,
            ).start()
            r = make_record()

            def flood() -> None:
                for _ in range(20_000):
                    recorder.record(r)

            # A blocking write to the frozen child's full pipe would never return;
            # the generous bound only guards the test against hanging.
            assert _returns_within(flood, 60), "record() waited on the frozen child"
            # Then hand the recorder thread records at a pace it keeps up with, so
            # that they reach the (full) pipe however loaded the machine is.
            for _ in range(100):
                if dropped("span", metrics) > 1_000:
                    break
                for _ in range(100):
                    recorder.record(r)
                deadline = time.monotonic() + 20
                while recorder.pending and time.monotonic() < deadline:
                    time.sleep(0.005)
            # The 1 MiB pipe holds ~1,500 lines and the queue 1,000 records: the
            # rest were dropped, at the pipe or (when the flood outran the
            # recorder thread) at the queue.
            span_drops = dropped("span", metrics)
            queue_drops = _queue_drops(metrics)
            assert span_drops > 1_000
            assert span_drops + queue_drops > 15_000
        finally:
            os.kill(pipe.proc.pid, signal.SIGCONT)
            recorder.close()
            stub.stop()

    def test_dead_child_is_restarted(self) -> None:
        """When the exporter process dies, spans are dropped (counted) and a new
        process takes over after RESTART_AFTER."""
        import os

        from authz.observe.spans import SpanPipe

        stub = CollectorStub()
        metrics = Metrics()
        pipe = SpanPipe({**os.environ, **stub.env}, metrics)
        pipe.RESTART_AFTER = 0.2
        recorder = DecisionRecorder(
            TracingSettings(flush_interval=0.01), spans=pipe, log_stream=io.StringIO()
        ).start()
        try:
            first = pipe.proc
            first.kill()
            first.wait(5)
            assert dropped("span", metrics) == 0
            recorder.record(make_record())
            deadline = time.monotonic() + 5
            while dropped("span", metrics) == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert dropped("span", metrics) == 1
            time.sleep(0.3)
            late = make_record()
            recorder.record(late)
            deadline = time.monotonic() + 5
            while pipe.proc is first and time.monotonic() < deadline:
                time.sleep(0.02)
            assert pipe.proc is not first
            recorder.close()  # the new child flushes on EOF
            ids = {_attrs(s)["egress_authz.decision_id"] for s in stub.wait_for(1)}
            assert late.decision.decision_id in ids
        finally:
            stub.stop()

    def test_config(self) -> None:
        """No OTEL_* means no child at all; an unsupported exporter fails at once."""
        from authz.observe.spans import spans_from_env

        assert spans_from_env({}) is None
        with pytest.raises(TracingConfigError):
            spans_from_env({"OTEL_TRACES_EXPORTER": "jaeger"})


class TestSampler:
    def test_sampler_from_env(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """OTEL_TRACES_SAMPLER set on purpose is obeyed (here: nothing is kept)."""
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
        exporter = InMemorySpanExporter()
        sink = span_sink([exporter], {"OTEL_TRACES_SAMPLER": "always_off"})
        assert sink is not None
        sink.emit(make_record(), record_fields(make_record()))
        sink.flush()
        assert exporter.get_finished_spans() == ()


class TestSpansAtShutdown:
    def test_spans_sent_just_before_sigterm_arrive(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """serve exporting to a loopback OTLP collector: Checks answered just before
        SIGTERM all arrive as spans, though the batch processor's 5 s delay had not
        passed (the exporter process flushes, then stops; it is not killed). The
        SIGTERM goes to serve's whole process group, as `kill -TERM -PGID` or a
        terminal would send it: the exporter process is not in that group."""
        import subprocess
        import sys

        from tests.test_server import (
            FINANCE_RULE,
            ROOT,
            Client,
            check_request,
            free_port,
            policy_yaml,
        )

        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "shop.yaml").write_text(
            policy_yaml(["api.kadath.io"], extra_rule=FINANCE_RULE)
        )
        stub = CollectorStub()
        try:
            env = {**os.environ, **stub.env, "OTEL_BSP_SCHEDULE_DELAY": "5000"}  # SDK default
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "authz", "serve", "--policies", str(policies),
                 "--grpc-address", f"127.0.0.1:{port}", "--admin-address", "",
                 "--trace-allow-ratio", "1"],
                stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
                env=env, start_new_session=True,
            )  # fmt: skip
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith("egress-authz: serving Check on"):
                    break
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            client = Client(port)
            ids = []
            for _ in range(30):
                r = client.check(check_request())
                ids.append(r.dynamic_metadata.fields["decision_id"].string_value)
            client.close()
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            # Everything was exported before serve exited: no waiting here.
            got = {_attrs(sp)["egress_authz.decision_id"] for sp in stub.spans}
        finally:
            stub.stop()
            if proc.poll() is None:
                proc.kill()
        assert got == set(ids)
