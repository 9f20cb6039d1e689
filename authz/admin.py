"""The admin HTTP endpoint: health, metrics and the recorded decisions.

It runs beside the gRPC port on its own threads and only reads what the
recorder kept (the ring buffer and its live subscribers), so nothing here is
on the Check path. The standard library's server is enough for a handful of
operators and a Prometheus scrape. Binds 127.0.0.1 unless told otherwise: the
decisions name workloads and hosts, so they are not for the whole network.

Routes (a public contract, docs/tracing.md "Admin endpoint"):
  GET /healthz                    200 while the process serves
  GET /readyz                     200 once a policy is loaded, else 503
  GET /metrics                    Prometheus text format
  GET /v1/decisions?FILTERS       recorded decisions, newest first
  GET /v1/decisions/stream?FILTERS  live decisions as server-sent events
  GET /v1/decisions/{id}          one decision with its explanation
FILTERS: namespace, workload (ns/sa, a service account or a pod), host
(a name or *.suffix), verdict, reason, since (10m, 1h, 30s or RFC 3339),
limit.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .metrics import REGISTRY
from .model import Reason, Verdict
from .records import DecisionRecord
from .tracing import DecisionRecorder, record_detail

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:9090"
DEFAULT_LIMIT = 100
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_FILTERS = frozenset({"namespace", "workload", "host", "verdict", "reason", "since", "limit"})
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class QueryError(ValueError):
    """A filter the caller got wrong: answered with 400 and this message."""


def parse_duration(text: str) -> float:
    """'90s', '10m', '1h30m', '2d' -> seconds."""
    text = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise QueryError(f"bad duration {text!r}: use e.g. 30s, 10m, 1h30m, 2d")
    return total


def parse_since(text: str, now: float | None = None) -> int:
    """A duration back from now, or an RFC 3339 time -> unix nanoseconds."""
    now = time.time() if now is None else now
    if text[:1].isdigit() and ("T" in text or "-" in text):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as e:
            raise QueryError(f"bad time {text!r}: use RFC 3339 or a duration") from e
        if moment.tzinfo is None:
            raise QueryError(f"bad time {text!r}: give a timezone (e.g. Z)")
        return int(moment.timestamp() * 1e9)
    seconds = parse_duration(text)
    if not seconds < now:  # before 1970, or too long for a float (400 nines): everything
        return 0
    return int((now - seconds) * 1e9)


def _host_matches(pattern: str, rec: DecisionRecord) -> bool:
    dest = rec.destination
    raw = (rec.decision.host, dest.sni if dest else None, dest.http_host if dest else None)
    # A Host header may carry ":port"; bracketed IPv6 literals never match a name.
    names = {n.lower().rsplit(":", 1)[0].rstrip(".") for n in raw if n}
    if pattern.startswith("*."):
        return any(n.endswith(pattern[1:]) for n in names)
    return pattern in names


@dataclass(frozen=True, slots=True)
class DecisionQuery:
    namespace: str | None = None
    workload: str | None = None
    host: str | None = None
    verdict: Verdict | None = None
    reason: Reason | None = None
    since_unix_ns: int | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def from_params(cls, params: Mapping[str, list[str]]) -> DecisionQuery:
        def one(name: str) -> str | None:
            values = params.get(name)
            return (values[-1].strip() or None) if values else None

        unknown = set(params) - _FILTERS
        if unknown:
            raise QueryError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        verdict = one("verdict")
        reason = one("reason")
        since = one("since")
        limit = one("limit")
        try:
            verdict_v = Verdict(verdict.lower()) if verdict else None
        except ValueError as e:
            raise QueryError(f"bad verdict {verdict!r}: use allow, deny or audit") from e
        try:
            reason_v = Reason(reason.lower()) if reason else None
        except ValueError as e:
            raise QueryError(f"unknown reason {reason!r}") from e
        try:
            limit_v = int(limit) if limit else DEFAULT_LIMIT
        except ValueError as e:
            raise QueryError(f"bad limit {limit!r}") from e
        if limit_v < 1:
            raise QueryError("limit must be at least 1")
        host = one("host")
        return cls(
            namespace=one("namespace"),
            workload=one("workload"),
            host=host.lower().rstrip(".") if host else None,
            verdict=verdict_v,
            reason=reason_v,
            since_unix_ns=parse_since(since) if since else None,
            limit=limit_v,
        )

    def matches(self, rec: DecisionRecord) -> bool:
        d = rec.decision
        if self.verdict is not None and d.verdict is not self.verdict:
            return False
        if self.reason is not None and d.reason is not self.reason:
            return False
        if self.since_unix_ns is not None and rec.start_unix_ns < self.since_unix_ns:
            return False
        workload = rec.identity.workload if rec.identity else None
        if self.namespace is not None:
            ns = d.namespace or (workload.namespace if workload else "")
            if ns != self.namespace:
                return False
        if self.workload is not None:
            if "/" in self.workload:
                if d.workload != self.workload:
                    return False
            elif self.workload not in (d.service_account, workload.name if workload else None):
                return False
        return self.host is None or _host_matches(self.host, rec)


class _Handler(BaseHTTPRequestHandler):
    server: AdminHTTPServer
    # HTTP/1.0: one request per connection, so a stream ends by closing it
    # and no chunked encoding is needed.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin %s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        try:
            if path == "/healthz":
                self._text(HTTPStatus.OK, "ok\n")
            elif path == "/readyz":
                ready = self.server.is_ready()
                self._text(
                    HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                    "ready\n" if ready else "not ready: no policy loaded yet\n",
                )
            elif path == "/metrics":
                self._send(HTTPStatus.OK, METRICS_CONTENT_TYPE, REGISTRY.render().encode())
            elif path.startswith("/v1/decisions"):
                self._decisions(path, parse_qs(url.query, keep_blank_values=True))
            else:
                # The page (authz/ui): its static files and the views it reads.
                from .ui.routes import answer

                page = answer(path, parse_qs(url.query, keep_blank_values=True),
                              self.server.recorder)  # fmt: skip
                if page is None:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {url.path}"})
                    return
                self.send_response(page.status)
                for name, value in {"Content-Type": page.content_type, **page.headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(page.body)))
                self.end_headers()
                self.wfile.write(page.body)
        except QueryError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; nothing to answer

    def _decisions(self, path: str, params: dict[str, list[str]]) -> None:
        recorder = self.server.recorder
        if recorder is None:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "decision recording is off"})
            return
        if path == "/v1/decisions":
            query = DecisionQuery.from_params(params)
            found = []
            for rec in reversed(recorder.ring.snapshot()):
                if query.matches(rec):
                    found.append(record_detail(rec))
                    if len(found) >= query.limit:
                        break
            self._json(
                HTTPStatus.OK,
                {
                    "decisions": found,
                    "count": len(found),
                    "buffered": len(recorder.ring),
                    "capacity": recorder.ring.capacity,
                },
            )
        elif path == "/v1/decisions/stream":
            self._stream(recorder, DecisionQuery.from_params(params), "limit" in params)
        else:
            decision_id = unquote(path.removeprefix("/v1/decisions/"))
            found_rec = recorder.ring.find(decision_id)
            if found_rec is None:
                self._json(
                    HTTPStatus.NOT_FOUND,
                    {
                        "error": f"decision {decision_id} is not in the buffer (too old, "
                        "from another replica, or never recorded)"
                    },
                )
            else:
                self._json(HTTPStatus.OK, record_detail(found_rec))

    def _stream(self, recorder: DecisionRecorder, query: DecisionQuery, limited: bool) -> None:
        """Server-sent events: replay from `since` if given, then live decisions."""
        sub = recorder.ring.subscribe()
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self._write(": stream open\n\n")
            sent = 0
            # Subscribed before the snapshot, so a record appended in between
            # is both replayed and queued: skip it the second time.
            replayed: set[str] = set()
            if query.since_unix_ns is not None:
                for rec in recorder.ring.snapshot():
                    if query.matches(rec):
                        self._event(rec)
                        replayed.add(rec.decision.decision_id)
                        sent += 1
                        if limited and sent >= query.limit:
                            return
            last_write = time.monotonic()
            while not self.server.stopping.is_set():
                try:
                    rec = sub.queue.get(timeout=min(0.5, self.server.heartbeat))
                except queue.Empty:
                    # A heartbeat keeps proxies from closing an idle stream and
                    # is how a vanished client is noticed (the write fails).
                    if time.monotonic() - last_write >= self.server.heartbeat:
                        self._write(": keepalive\n\n")
                        last_write = time.monotonic()
                    continue
                if rec.decision.decision_id in replayed or not query.matches(rec):
                    continue
                self._event(rec)
                last_write = time.monotonic()
                sent += 1
                if limited and sent >= query.limit:
                    return
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            log.debug("decision stream client went away")
        finally:
            recorder.ring.unsubscribe(sub)

    def _event(self, rec: DecisionRecord) -> None:
        data = json.dumps(record_detail(rec), separators=(",", ":"))
        self._write(f"id: {rec.decision.decision_id}\nevent: decision\ndata: {data}\n\n")

    def _write(self, text: str) -> None:
        self.wfile.write(text.encode())
        self.wfile.flush()

    def _json(self, status: HTTPStatus, body: Any) -> None:
        data = (json.dumps(body, indent=None, separators=(",", ":")) + "\n").encode()
        self._send(status, "application/json", data)

    def _text(self, status: HTTPStatus, text: str) -> None:
        self._send(status, "text/plain; charset=utf-8", text.encode())

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class AdminHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck stream client must not keep the process alive

    def __init__(
        self,
        address: tuple[str, int],
        recorder: DecisionRecorder | None,
        ready: Callable[[], bool],
        heartbeat: float,
    ) -> None:
        if ":" in address[0]:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.recorder = recorder
        self.ready = ready
        self.heartbeat = heartbeat
        self.stopping = threading.Event()

    def is_ready(self) -> bool:
        try:
            return bool(self.ready())
        except Exception:
            log.exception("readiness check failed")
            return False


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9090', '[::1]:9090', ':9090' (127.0.0.1), '0.0.0.0:9090'."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad admin address {text!r}: use HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class AdminServer:
    """The admin endpoint on a background thread: start(), then stop()."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        recorder: DecisionRecorder | None = None,
        ready: Callable[[], bool] = lambda: True,
        *,
        heartbeat: float = 15.0,
    ) -> None:
        self.httpd = AdminHTTPServer(parse_address(address), recorder, ready, heartbeat)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.httpd.server_address[0])
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def start(self) -> AdminServer:
        # A short poll interval so that stop() returns quickly (tests, SIGTERM).
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,), name="egress-authz-admin", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.stopping.set()  # ends open streams within half a second
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()

    close = stop  # what `serve` calls on everything it started
