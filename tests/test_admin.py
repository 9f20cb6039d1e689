"""authz.admin: the admin HTTP endpoint against a running server fed with records."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from authz.admin import AdminServer, DecisionQuery, QueryError, parse_address, parse_duration
from authz.model import Protocol, Reason, Verdict
from authz.tracing import DecisionRecorder, TracingSettings
from tests.test_tracing import make_record


@pytest.fixture
def recorder() -> Iterator[DecisionRecorder]:
    rec = DecisionRecorder(
        TracingSettings(ring_size=100, flush_interval=0.01), log_stream=io.StringIO()
    )
    rec.start()
    yield rec
    rec.close()


@pytest.fixture
def admin(recorder: DecisionRecorder) -> Iterator[AdminServer]:
    ready = {"value": True}
    server = AdminServer("127.0.0.1:0", recorder, lambda: ready["value"], heartbeat=0.2)
    server.ready_flag = ready  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()


def get(server: AdminServer, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def get_json(server: AdminServer, path: str) -> tuple[int, Any]:
    status, _, body = get(server, path)
    return status, json.loads(body)


def feed(recorder: DecisionRecorder) -> dict[str, Any]:
    """A small, varied history: two namespaces, three verdicts, TLS and HTTP."""
    now = time.time_ns()
    recs = {
        "old": make_record(start_unix_ns=now - 3600 * 10**9, host="old.kadath.io"),
        "allow": make_record(verdict=Verdict.ALLOW, host="api.kadath.io"),
        "deny": make_record(host="api.leng.com"),
        "audit": make_record(
            verdict=Verdict.AUDIT,
            namespace="marketing",
            account="crm",
            pod="crm-1",
            host="hooks.slack.com",
            protocol=Protocol.HTTP,
            port=443,
            method="POST",
            path="/x",
        ),
        "port": make_record(reason=Reason.PORT_NOT_ALLOWED, host="api.kadath.io", port=8443),
    }
    for r in recs.values():
        recorder.record(r)
    return recs


class TestHealth:
    def test_healthz(self, admin: AdminServer) -> None:
        """/healthz answers 200 while the process serves."""
        assert get(admin, "/healthz")[0] == 200

    def test_readyz_follows_callable(self, admin: AdminServer) -> None:
        """/readyz is 200 when the ready callable says so, 503 otherwise."""
        assert get(admin, "/readyz")[0] == 200
        admin.ready_flag["value"] = False  # type: ignore[attr-defined]
        status, _, body = get(admin, "/readyz")
        assert status == 503 and "no policy" in body

    def test_readyz_callable_raising_is_not_ready(self, recorder: DecisionRecorder) -> None:
        """A readiness callable that raises means not ready, not a crash."""

        def boom() -> bool:
            raise RuntimeError("x")

        server = AdminServer("127.0.0.1:0", recorder, boom).start()
        try:
            assert get(server, "/readyz")[0] == 503
        finally:
            server.stop()

    def test_unknown_path(self, admin: AdminServer) -> None:
        """Unknown paths are 404 with a JSON error."""
        status, body = get_json(admin, "/nope")
        assert status == 404 and "no such path" in body["error"]


class TestMetrics:
    def test_prometheus_text(self, admin: AdminServer, recorder: DecisionRecorder) -> None:
        """/metrics serves the registry in the Prometheus text format, with our checks."""
        recorder.record(make_record(namespace="metrics-admin"))
        status, ctype, body = get(admin, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert "# TYPE egress_authz_checks_total counter" in body
        assert (
            'egress_authz_checks_total{verdict="deny",reason="host-not-allowed",'
            'namespace="metrics-admin"} 1' in body
        )
        for name in (
            "egress_authz_check_duration_seconds_bucket",
            "egress_authz_policy_revision",
            "egress_authz_trace_records_dropped_total",
        ):
            assert name in body


class TestDecisionList:
    def test_newest_first(self, admin: AdminServer, recorder: DecisionRecorder) -> None:
        """The list is newest first and carries the log fields plus labels."""
        recs = feed(recorder)
        status, body = get_json(admin, "/v1/decisions")
        assert status == 200
        ids = [d["decision_id"] for d in body["decisions"]]
        assert ids == [r.decision.decision_id for r in reversed(list(recs.values()))]
        assert body["buffered"] == 5 and body["capacity"] == 100
        assert body["decisions"][0]["labels"] == {"app": "cart"}

    @pytest.mark.parametrize(
        "query, expected",
        [
            ("namespace=marketing", ["audit"]),
            ("verdict=deny", ["port", "deny", "old"]),
            ("verdict=AUDIT", ["audit"]),
            ("reason=port-not-allowed", ["port"]),
            ("host=api.kadath.io", ["port", "allow"]),
            ("host=*.kadath.io", ["port", "allow", "old"]),
            ("host=API.Kadath.IO.", ["port", "allow"]),
            ("workload=marketing/crm", ["audit"]),
            ("workload=crm", ["audit"]),
            ("workload=crm-1", ["audit"]),
            ("since=10m", ["port", "audit", "deny", "allow"]),
            ("since=10m&verdict=deny&limit=1", ["port"]),
            ("namespace=nobody", []),
        ],
    )
    def test_filters(
        self, admin: AdminServer, recorder: DecisionRecorder, query: str, expected: list[str]
    ) -> None:
        """Each filter narrows the list; filters combine with AND; limit caps it."""
        recs = feed(recorder)
        by_id = {r.decision.decision_id: k for k, r in recs.items()}
        status, body = get_json(admin, "/v1/decisions?" + query)
        assert status == 200
        assert [by_id[d["decision_id"]] for d in body["decisions"]] == expected

    @pytest.mark.parametrize(
        "query, message",
        [
            ("verdict=maybe", "bad verdict"),
            ("reason=because", "unknown reason"),
            ("since=yesterday", "bad duration"),
            ("limit=0", "limit"),
            ("limit=x", "bad limit"),
            ("colour=red", "unknown filter"),
        ],
    )
    def test_bad_filters(self, admin: AdminServer, query: str, message: str) -> None:
        """A bad filter is a 400 that says what is wrong."""
        status, body = get_json(admin, "/v1/decisions?" + query)
        assert status == 400 and message in body["error"]

    def test_recording_off(self) -> None:
        """Without a recorder the decision routes say so (503), health still works."""
        server = AdminServer("127.0.0.1:0", None).start()
        try:
            status, body = get_json(server, "/v1/decisions")
            assert status == 503 and "off" in body["error"]
            assert get(server, "/healthz")[0] == 200
        finally:
            server.stop()


class TestDecisionDetail:
    def test_one_with_explanation(self, admin: AdminServer, recorder: DecisionRecorder) -> None:
        """/v1/decisions/{id} returns the decision with the rules considered."""
        recs = feed(recorder)
        rid = recs["deny"].decision.decision_id
        status, body = get_json(admin, f"/v1/decisions/{rid}")
        assert status == 200
        assert body["decision_id"] == rid and body["verdict"] == "deny"
        assert body["explanation"] == [
            {
                "rule": "shop/egress-policy/kadath-api",
                "matched": False,
                "why": "host api.leng.com is not in hosts [api.kadath.io]",
                "owner": "team-integrations",
            }
        ]
        assert body["principal"] == "spiffe://cluster.local/ns/shop/sa/cart"
        assert body["policy_source"] == "shop/egress-policy"

    def test_unknown_id(self, admin: AdminServer) -> None:
        """An id not in the buffer is a 404 explaining why it may be missing."""
        status, body = get_json(admin, "/v1/decisions/doesnotexist")
        assert status == 404 and "not in the buffer" in body["error"]


def read_events(resp: Any, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    data: list[str] = []
    while len(events) < count:
        line = resp.readline().decode().rstrip("\n")
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            events.append(json.loads("".join(data)))
            data = []
    return events


class TestStream:
    def test_live_with_filters(self, admin: AdminServer, recorder: DecisionRecorder) -> None:
        """The stream delivers new decisions matching the filters, as SSE events."""
        resp = urllib.request.urlopen(admin.url + "/v1/decisions/stream?verdict=deny", timeout=5)
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.readline() == b": stream open\n"
        time.sleep(0.05)
        allow = make_record(verdict=Verdict.ALLOW)
        deny = make_record()
        recorder.record(allow)
        recorder.record(deny)
        (event,) = read_events(resp, 1)
        assert event["decision_id"] == deny.decision.decision_id
        resp.close()

    def test_since_replays_then_follows(
        self, admin: AdminServer, recorder: DecisionRecorder
    ) -> None:
        """With since, buffered decisions come first (oldest first), then live ones; limit
        closes the stream."""
        recs = feed(recorder)
        time.sleep(0.1)
        resp = urllib.request.urlopen(
            admin.url + "/v1/decisions/stream?since=10m&namespace=shop&limit=4", timeout=5
        )
        replay = read_events(resp, 3)
        assert [e["decision_id"] for e in replay] == [
            recs[k].decision.decision_id for k in ("allow", "deny", "port")
        ]
        live = make_record()
        recorder.record(live)
        (event,) = read_events(resp, 1)
        assert event["decision_id"] == live.decision.decision_id
        assert resp.read() == b""  # the limit reached: the server closed the stream

    def test_heartbeat_and_disconnect(self, admin: AdminServer, recorder: DecisionRecorder) -> None:
        """Idle streams get heartbeat comments; a client that leaves is unsubscribed."""
        sock = socket.create_connection(("127.0.0.1", admin.port), timeout=5)
        sock.sendall(b"GET /v1/decisions/stream HTTP/1.0\r\n\r\n")
        buf = b""
        deadline = time.monotonic() + 5
        while b": keepalive" not in buf and time.monotonic() < deadline:
            buf += sock.recv(4096)
        assert b": keepalive" in buf
        assert len(recorder.ring._subscribers) == 1
        sock.close()
        deadline = time.monotonic() + 5
        while recorder.ring._subscribers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not recorder.ring._subscribers

    def test_stop_ends_streams(self, recorder: DecisionRecorder) -> None:
        """Stopping the server ends open streams promptly."""
        server = AdminServer("127.0.0.1:0", recorder, heartbeat=10).start()
        resp = urllib.request.urlopen(server.url + "/v1/decisions/stream", timeout=5)
        resp.readline()
        done = threading.Event()

        def drain() -> None:
            resp.read()
            done.set()

        threading.Thread(target=drain, daemon=True).start()
        t0 = time.monotonic()
        server.stop()
        assert done.wait(5) and time.monotonic() - t0 < 3


class TestParsing:
    @pytest.mark.parametrize(
        "text, seconds",
        [("30s", 30), ("10m", 600), ("1h30m", 5400), ("2d", 172800), ("500ms", 0.5)],
    )
    def test_durations(self, text: str, seconds: float) -> None:
        """Durations read like kubectl's."""
        assert parse_duration(text) == seconds

    def test_since_rfc3339(self) -> None:
        """since accepts an RFC 3339 time; a naive one is refused."""
        q = DecisionQuery.from_params({"since": ["2026-01-01T00:00:00Z"]})
        assert q.since_unix_ns == 1767225600 * 10**9
        with pytest.raises(QueryError, match="timezone"):
            DecisionQuery.from_params({"since": ["2026-01-01T00:00:00"]})

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("127.0.0.1:9090", ("127.0.0.1", 9090)),
            (":9090", ("127.0.0.1", 9090)),
            ("[::1]:9090", ("::1", 9090)),
            ("0.0.0.0:0", ("0.0.0.0", 0)),
        ],
    )
    def test_addresses(self, text: str, expected: tuple[str, int]) -> None:
        """Admin addresses default to loopback when no host is given."""
        assert parse_address(text) == expected

    def test_bad_address(self) -> None:
        """A malformed address is refused with the expected form."""
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address("localhost")
