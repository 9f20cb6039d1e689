"""authz.observe.admin: the admin HTTP endpoint against a running server fed with records."""

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
from prometheus_client.parser import text_string_to_metric_families

from authz.model import Protocol, Reason, Verdict
from authz.observe.admin import AdminServer, parse_address
from authz.observe.httpserve import CpuBudget, HTTPLimits
from authz.observe.metrics import Metrics
from authz.observe.query import MAX_LIMIT, DecisionQuery, QueryError, parse_duration
from authz.observe.recorder import DecisionRecorder, TracingSettings
from tests.test_tracing import make_record


@pytest.fixture
def metrics() -> Metrics:
    """A registry of the test's own: counts start at zero and nothing else adds to them."""
    return Metrics()


@pytest.fixture
def recorder(metrics: Metrics) -> Iterator[DecisionRecorder]:
    rec = DecisionRecorder(
        TracingSettings(ring_size=100, flush_interval=0.01),
        log_stream=io.StringIO(),
        metrics=metrics,
    )
    rec.start()
    yield rec
    rec.close()


@pytest.fixture
def admin(recorder: DecisionRecorder, metrics: Metrics) -> Iterator[AdminServer]:
    ready = {"value": True}
    server = AdminServer(
        "127.0.0.1:0", recorder, lambda: ready["value"], heartbeat=0.2, metrics=metrics
    )
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


def sample(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """A sample's value in Prometheus text, parsed as Prometheus would (None: absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == (labels or {}):
                return float(s.value)
    return None


class TestMetrics:
    def test_prometheus_text(self, admin: AdminServer, recorder: DecisionRecorder) -> None:
        """/metrics serves the registry in the Prometheus text format, with our checks."""
        recorder.record(make_record(namespace="metrics-admin"))
        status, ctype, body = get(admin, "/metrics")
        assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
        assert "# TYPE egress_authz_checks_total counter" in body
        labels = {"verdict": "deny", "reason": "host-not-allowed", "namespace": "metrics-admin"}
        assert sample(body, "egress_authz_checks_total", labels) == 1
        for name in (
            "egress_authz_check_duration_seconds_bucket",
            "egress_authz_policy_revision",
            "egress_authz_trace_records_dropped_total",
        ):
            assert name in body


def raw_get(server: AdminServer, path: str, host: str | None) -> bytes:
    """A GET with exactly the Host header given (None: no Host header at all)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
        sock.sendall((head + "\r\n").encode())
        return read_all(sock, 5)


class TestHostHeader:
    """DNS rebinding: a page on attacker.example whose name resolves to 127.0.0.1."""

    def test_rebound_name_is_refused(
        self, admin: AdminServer, recorder: DecisionRecorder, metrics: Metrics
    ) -> None:
        """A request naming a foreign host gets 421 and no decision, and is counted."""
        recorder.record(make_record(namespace="secret-ns"))
        recorder.flush()
        for path in ("/v1/decisions", "/metrics", "/"):
            answer = raw_get(admin, path, f"attacker.example:{admin.port}")
            assert answer.startswith(b"HTTP/1.0 421"), answer[:80]
            assert b"secret-ns" not in answer
        assert metrics.value("egress_authz_admin_refused_total", {"reason": "host"}) == 3

    @pytest.mark.parametrize(
        "host",
        ["localhost:9090", "LOCALHOST", "127.0.0.1:9090", "[::1]:9090", "10.1.2.3:9090",
         "ui.localhost:9090", None],
    )
    def test_loopback_names_and_addresses_are_served(
        self, admin: AdminServer, host: str | None
    ) -> None:
        """localhost, IP literals (probes and Prometheus use the pod IP) and no Host pass."""
        assert raw_get(admin, "/healthz", host).startswith(b"HTTP/1.0 200")

    def test_configured_names_are_served(self, recorder: DecisionRecorder) -> None:
        """A name given in allowed_hosts (a Service's DNS name) is accepted, others not."""
        server = AdminServer(
            "127.0.0.1:0", recorder, allowed_hosts=["authz.egress-authz.svc"]
        ).start()
        try:
            assert raw_get(server, "/healthz", "authz.egress-authz.svc:9090").startswith(
                b"HTTP/1.0 200"
            )
            assert raw_get(server, "/healthz", "authz.evil.example").startswith(b"HTTP/1.0 421")
        finally:
            server.stop()


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
            # More fields than parse_qs accepts: was a dropped connection and a
            # traceback in the service log per request (a log flood).
            ("&".join(f"host=h{i}.example" for i in range(40)), "too many query parameters"),
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


# ---------------------------------------------------------------------------
# Limits: what a hostile or careless client can make the endpoint spend.


def limited(
    recorder: DecisionRecorder | None, metrics: Metrics | None = None, **kw: Any
) -> AdminServer:
    return AdminServer(
        "127.0.0.1:0", recorder, heartbeat=0.2, limits=HTTPLimits(**kw), metrics=metrics
    ).start()


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything until the server closes, or raise if it has not within `timeout`."""
    sock.settimeout(timeout)
    out = b""
    try:
        while chunk := sock.recv(4096):
            out += chunk
    except ConnectionResetError:
        pass  # closed with our unread request bytes in its buffer: a reset
    return out


class TestSlowClients:
    def test_idle_half_sent_requests_cost_no_thread(self, recorder: DecisionRecorder) -> None:
        """300 connections that never finish their request head: no thread each, at
        most max_connections held, a real request still answered, and every one of
        them closed by the head timeout."""
        server = limited(recorder, max_connections=50, head_timeout=1.0)
        threads = threading.active_count()
        socks = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                s.sendall(b"GET /v1/decisions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                socks.append(s)
            assert threading.active_count() == threads
            assert get(server, "/healthz")[0] == 200
            assert server.httpd.waiting_connections <= 50
            t0 = time.monotonic()
            answers = [read_all(s, 5) for s in socks]
            assert time.monotonic() - t0 < 4
            # The last 50 waited out the timeout (408); older ones were closed to
            # make room for newer connections.
            assert sum(a.startswith(b"HTTP/1.0 408") for a in answers) >= 49
            assert server.httpd.waiting_connections == 0
        finally:
            for s in socks:
                s.close()
            server.stop()

    def test_trickling_client_closed_at_deadline(self, recorder: DecisionRecorder) -> None:
        """A client sending a byte at a time is cut off at head_timeout from connecting,
        however often it sends."""
        server = limited(recorder, head_timeout=0.5)
        try:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            t0 = time.monotonic()
            s.settimeout(0.1)
            answer = b""
            for byte in b"GET /healthz HTTP/1.0\r\nX-A: " + b"a" * 100:
                try:
                    s.send(bytes([byte]))
                    answer = s.recv(4096)
                    break  # the server answered (408) or closed (b"")
                except TimeoutError:
                    continue  # still open: trickle on
                except OSError:
                    break
            elapsed = time.monotonic() - t0
            assert 0.4 < elapsed < 2, elapsed
            assert answer == b"" or answer.startswith(b"HTTP/1.0 408")
            s.close()
        finally:
            server.stop()

    def test_huge_head_refused(self, recorder: DecisionRecorder) -> None:
        """A request head over max_head_bytes is answered 431 and closed."""
        server = limited(recorder, max_head_bytes=1024)
        try:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"GET /healthz HTTP/1.0\r\nX-Big: " + b"a" * 4096)
            assert read_all(s, 5).startswith(b"HTTP/1.0 431")
            s.close()
        finally:
            server.stop()

    def test_full_backlog_answers_503(self, recorder: DecisionRecorder) -> None:
        """With every worker busy and the backlog full, a request gets 503 at once."""
        entered, release = threading.Event(), threading.Event()

        def slow_ready() -> bool:
            entered.set()
            release.wait(10)
            return True

        server = AdminServer(
            "127.0.0.1:0", recorder, slow_ready, limits=HTTPLimits(workers=1, backlog=1)
        ).start()
        try:
            first = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            first.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            assert entered.wait(5)
            second = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            second.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            deadline = time.monotonic() + 5
            while server.httpd._queue.qsize() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, _, body = get(server, "/healthz")
            assert status == 503 and "busy" in body
            release.set()
            assert read_all(first, 5).startswith(b"HTTP/1.0 200")
            assert read_all(second, 5).startswith(b"HTTP/1.0 200")
            first.close()
            second.close()
        finally:
            release.set()
            server.stop()


class TestCaps:
    def test_streams_beyond_cap_get_503(self, recorder: DecisionRecorder) -> None:
        """Streams beyond max_streams are refused with 503; a closed one frees its slot."""
        server = limited(recorder, max_streams=2)
        try:
            open_ = [
                urllib.request.urlopen(server.url + "/v1/decisions/stream", timeout=5)
                for _ in range(2)
            ]
            for resp in open_:
                assert resp.readline() == b": stream open\n"
            status, _, body = get(server, "/v1/decisions/stream")
            assert status == 503 and "too many open streams (at most 2)" in body
            assert get(server, "/v1/decisions")[0] == 200  # ordinary requests unaffected
            open_[0].close()
            deadline = time.monotonic() + 5
            while len(server.streams) > 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            again = urllib.request.urlopen(server.url + "/v1/decisions/stream", timeout=5)
            assert again.readline() == b": stream open\n"
            again.close()
            open_[1].close()
        finally:
            server.stop()

    def test_limit_capped(self, recorder: DecisionRecorder) -> None:
        """?limit=1000000000 returns at most MAX_LIMIT decisions and says so."""
        big = DecisionRecorder(
            TracingSettings(ring_size=2000, flush_interval=0.01), log_stream=io.StringIO()
        )
        for _ in range(1500):
            big.record(make_record())
        server = limited(big)
        try:
            status, body = get_json(server, "/v1/decisions?limit=1000000000")
            assert status == 200
            assert body["count"] == MAX_LIMIT == body["limit"] == 1000
            assert body["buffered"] == 1500
            status, body = get_json(server, "/v1/decisions")
            assert body["count"] == body["limit"] == 100  # the default
        finally:
            server.stop()
            big.close()

    def test_cpu_budget_slows_admin_work_not_checks(self) -> None:
        """Work charged beyond the budget's burst is paid back by sleeping (GIL
        released) at `share` seconds per second."""
        budget = CpuBudget(share=0.1, burst=0.0)
        t0 = time.monotonic()
        budget.charge(0.01)
        assert time.monotonic() - t0 >= 0.09 and budget.waited >= 0.09

    def test_query_work_is_metered(self) -> None:
        """Large queries pay into the budget: with a tiny share, repeated large queries
        spend most of their time sleeping rather than holding the GIL."""
        big = DecisionRecorder(
            TracingSettings(ring_size=5000, flush_interval=0.01), log_stream=io.StringIO()
        )
        for _ in range(5000):
            big.record(make_record())
        metrics = Metrics()
        server = limited(big, metrics=metrics)
        server.budget = CpuBudget(share=0.02, burst=0.0, metrics=metrics)
        try:
            assert get_json(server, "/v1/decisions?limit=1000")[0] == 200
            # what /metrics reports
            assert metrics.value("egress_authz_admin_cpu_seconds_total") > 0
            # Paid back at 2% of a core: the handler slept ~50x the CPU it used.
            assert server.budget.waited > 0.1
        finally:
            server.stop()
            big.close()

    def test_post_refused(self, admin: AdminServer) -> None:
        """Only GET (and HEAD): anything else is 405."""
        req = urllib.request.Request(admin.url + "/healthz", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 405
