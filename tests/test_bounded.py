"""authz.observe.bounded and the recorder: caller-controlled fields are cut and query values
dropped before anything is stored, logged or served."""

from __future__ import annotations

import gc
import io
import json
import tracemalloc
from collections.abc import Callable

import pytest

from authz.model import Destination, Identity, Protocol, Reason, RuleCheck, Verdict
from authz.observe.bounded import (
    DEFAULT_LIMITS,
    ELLIPSIS,
    RecordLimits,
    bound_explanation,
    bound_record,
    cut,
    strip_query,
)
from authz.observe.decisionlog import LOG_FIELDS, LOG_LINE_MAX, detail_json, log_line, record_detail
from authz.observe.recorder import DecisionRecorder, TracingSettings
from authz.records import DecisionRecord
from tests.test_tracing import make_record

SECRET = "sk_live_51HxQ"
LONG = 16_000


def http_record(path: str, host: str = "api.kadath.io", **kw: object) -> DecisionRecord:
    rec = make_record(
        protocol=Protocol.HTTP, host=host, method="GET", path=path, reason=Reason.PATH_NOT_ALLOWED
    )
    d = rec.decision
    d.message = f"shop/cart may reach {host}, but not path {path}"
    raw_path = path
    d.explainer = lambda: (
        RuleCheck("shop/egress-policy/r", False, f"path {raw_path} starts with none of ['/v2']"),
    )
    return rec


def long_record(n: int = LONG) -> DecisionRecord:
    """A hostile request: 16 KB host (as SNI and Host), path, principal and method."""
    host = "a" * n + ".kadath.io"
    rec = http_record("/" + "p" * n, host=host)
    assert rec.identity is not None and rec.destination is not None
    rec.identity = Identity(principal="spiffe://x/" + "n" * n, source_ip="1" * n)
    rec.destination = Destination(
        port=443,
        protocol=Protocol.HTTP,
        sni=host,
        http_host=host + ":443",
        method="G" * n,
        path="/" + "p" * n,
    )
    rec.decision.namespace = "n" * n
    rec.traceparent = "0" * n
    return rec


class TestQueryStrings:
    @pytest.mark.parametrize(
        "path, expected",
        [
            ("/v1/report?api_key=sk_live_x", "/v1/report?api_key"),
            ("/a?x=1&y=2&flag", "/a?x&y&flag"),
            ("/a?x=1#frag", "/a?x"),
            ("/a?", "/a"),
            ("/a?&&", "/a"),
            ("/no/query", "/no/query"),
        ],
    )
    def test_strip_query(self, path: str, expected: str) -> None:
        """Only parameter names survive; values and fragments are dropped."""
        assert strip_query(path) == expected

    def test_dropped_everywhere_by_default(self) -> None:
        """The secret is in none of: stored path, message, explanation, log line, admin JSON."""
        rec = bound_record(http_record(f"/v1/report?api_key={SECRET}&page=2"))
        assert rec.destination is not None
        assert rec.destination.path == "/v1/report?api_key&page"
        assert SECRET not in rec.decision.message
        assert all(SECRET not in c.why for c in rec.decision.explanation)
        assert SECRET not in log_line(rec, None)
        assert SECRET not in detail_json(rec)

    def test_opt_in_keeps_values(self) -> None:
        """With keep_query_values the path is recorded as sent."""
        path = f"/v1/report?api_key={SECRET}"
        rec = bound_record(http_record(path), RecordLimits(keep_query_values=True))
        assert rec.destination is not None and rec.destination.path == path

    def test_original_record_untouched(self) -> None:
        """Bounding builds a copy: the gRPC server's values are not changed."""
        rec = http_record(f"/x?k={SECRET}")
        bound_record(rec)
        assert rec.destination is not None and SECRET in (rec.destination.path or "")


class TestCaps:
    def test_every_field_capped(self) -> None:
        """host, SNI, Host, path, principal, method, namespace, message, trace headers."""
        rec = bound_record(long_record())
        lim = DEFAULT_LIMITS
        d, ident, dest = rec.decision, rec.identity, rec.destination
        assert ident is not None and dest is not None
        assert len(d.host) == lim.not_a_host and d.host.endswith(ELLIPSIS)
        assert dest.sni is not None and len(dest.sni) == lim.not_a_host
        assert dest.http_host is not None and len(dest.http_host) == lim.not_a_host
        assert dest.path is not None and len(dest.path) == lim.path
        assert dest.method is not None and len(dest.method) == lim.name
        assert len(ident.principal) == lim.principal and len(ident.source_ip) == lim.name
        assert len(d.namespace) == lim.name
        assert len(d.message) <= lim.message
        assert rec.traceparent is not None and len(rec.traceparent) == lim.trace_header
        assert all(len(c.why) <= lim.message for c in d.explanation)

    def test_sni_and_host_share_one_string(self) -> None:
        """Long SNI and Host (with a port) cut to the same text are stored once."""
        rec = bound_record(long_record())
        assert rec.destination is not None
        assert rec.destination.sni is rec.decision.host is rec.destination.http_host

    def test_valid_long_name_kept_whole(self) -> None:
        """A 253-character DNS name with a port is not cut."""
        name = ".".join(["a" * 63] * 3) + "." + "b" * 61
        rec = make_record(host=name, protocol=Protocol.HTTP)
        assert rec.destination is not None
        rec.destination.http_host = name + ":8443"
        out = bound_record(rec)
        assert out.decision.host == name and out.destination is not None
        assert out.destination.http_host == name + ":8443"

    def test_short_record_returned_as_is(self) -> None:
        """Nothing to cut: the same object (no copy on the common path)."""
        rec = make_record()
        assert bound_record(rec) is rec

    def test_cut(self) -> None:
        """cut() keeps short text and marks cut text with an ellipsis."""
        assert cut("abc", 3) == "abc" and cut("abcdefg", 6) == "abc" + ELLIPSIS

    def test_explanation_count_capped(self) -> None:
        """At most `explanation` rules, then one entry saying how many more."""
        checks = tuple(RuleCheck(f"ns/cm/r{i}", False, "x" * 2000) for i in range(100))
        kept = bound_explanation(checks)
        assert len(kept) == DEFAULT_LIMITS.explanation + 1
        assert kept[-1].why == "68 more rules not shown"
        assert all(len(c.why) <= DEFAULT_LIMITS.message for c in kept)


class TestLogLine:
    def test_long_fields_line_bounded(self) -> None:
        """A request of 16 KB fields gives a line within LOG_LINE_MAX bytes, in the log
        and in the ring (the recorder bounds before storing)."""
        out = io.StringIO()
        recorder = DecisionRecorder(TracingSettings(flush_interval=0.01), log_stream=out)
        recorder.record(long_record())
        recorder.close()
        line = out.getvalue().rstrip("\n")
        assert "\n" not in line and len(line.encode()) <= LOG_LINE_MAX
        stored = recorder.ring.snapshot()[0]
        assert stored.destination is not None
        assert len(stored.destination.path or "") == DEFAULT_LIMITS.path
        json.loads(line)

    def test_escaped_control_characters_still_fit(self) -> None:
        """Fields of control characters (6 bytes each once escaped) are re-cut to fit."""
        rec = long_record()
        assert rec.identity is not None and rec.destination is not None
        rec.identity.principal = "\x01" * LONG
        rec.destination.path = "/" + "\x02" * LONG
        rec.decision.rule = "\x03" * LONG
        out = io.StringIO()
        recorder = DecisionRecorder(TracingSettings(flush_interval=0.01), log_stream=out)
        recorder.record(rec)
        recorder.close()
        line = out.getvalue().rstrip("\n")
        assert len(line.encode()) <= LOG_LINE_MAX
        fields = json.loads(line)
        assert fields["principal"].startswith("\x01") and fields["principal"].endswith(ELLIPSIS)
        # Re-rendered by the same renderer: every key, and the id that joins the
        # line to spans and access logs kept whole.
        assert list(fields) == list(LOG_FIELDS)
        assert fields["decision_id"] == rec.decision.decision_id

    def test_detail_json_matches_record_detail(self) -> None:
        """The admin endpoint's fast JSON is exactly record_detail's."""
        for rec in (make_record(), make_record(verdict=Verdict.ALLOW), http_record("/a?b=c")):
            rec = bound_record(rec)
            assert json.loads(detail_json(rec)) == record_detail(rec)


def path_and_host_record(n: int = LONG) -> DecisionRecord:
    """The issue's attack: a 16 KB path and Host (and SNI), denied as invalid-host."""
    host = "h" * n + ".kadath.io"
    rec = http_record("/" + "p" * n, host=host)
    rec.decision.host = ""  # the engine records no host for an invalid one
    rec.decision.message = f"Host: name is {len(host)} characters long, over 253"
    rec.decision.explainer = None
    assert rec.destination is not None
    rec.destination.sni = host
    rec.destination.http_host = host
    return rec


def retained_per_record(make: Callable[[], DecisionRecord], n: int = 3_000) -> float:
    """Bytes the recorder keeps per decision after `n` of them (tracemalloc)."""
    recorder = DecisionRecorder(
        TracingSettings(ring_size=n, queue_size=n, decision_log=False), log_stream=io.StringIO()
    )
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for _ in range(n):
        recorder.record(make())
    recorder.close()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(recorder.ring) == n
    return used / n


class TestMemory:
    def test_long_path_and_host(self) -> None:
        """Decisions with 16 KB paths and hosts keep < 600 bytes more each than short
        ones (the raw strings are dropped). 3,000 here to keep the suite light; the
        service's RSS after 12,000 is `make bench BENCH_ARGS=doors`."""
        short = retained_per_record(lambda: path_and_host_record(4))
        long = retained_per_record(path_and_host_record)
        assert long - short < 600, f"{long - short:.0f} bytes more per long decision"

    def test_every_field_hostile(self) -> None:
        """Even with every caller-controlled field at 16 KB a decision stays within ~2 KB
        of a short one (the sum of the caps)."""
        short = retained_per_record(lambda: http_record("/p"), 1_000)
        long = retained_per_record(long_record, 1_000)
        assert long - short < 2_200, f"{long - short:.0f} bytes more per long decision"
