"""The admin HTTP endpoint: health, metrics and the recorded decisions.

It runs beside the gRPC port, in the same process, and only reads what the
recorder kept (the ring buffer and its live subscribers). Whatever its
clients do, it cannot take much from the Check path: connections, threads,
streams and queued requests are capped and timed out (authz/observe/httpserve.py),
`limit` is capped at MAX_LIMIT, and every handler's CPU time (GIL time, in
Python) is metered against a share of one core. Binds 127.0.0.1 unless told
otherwise: the decisions name workloads and hosts, so they are not for the
whole network.

Routes (a public contract, docs/tracing.md "Admin endpoint"):
  GET /healthz                    200 while the process serves
  GET /readyz                     200 once a policy is loaded, else 503
  GET /metrics                    Prometheus text format
  GET /v1/decisions?FILTERS       recorded decisions, newest first
  GET /v1/decisions/stream?FILTERS  live decisions as server-sent events
  GET /v1/decisions/{id}          one decision with its explanation
FILTERS: namespace, workload (ns/sa, a service account or a pod), host
(a name or *.suffix), verdict, reason, since (10m, 1h, 30s or RFC 3339),
limit (default 100; at most 1000 for the list).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ..records import DecisionRecord
from .decisionlog import detail_json
from .httpserve import BoundedHTTPServer, CpuBudget, HTTPLimits, Meter, Request, response_head
from .metrics import CONTENT_TYPE, METRICS, Metrics, exposition
from .query import MAX_LIMIT, DecisionQuery, QueryError
from .recorder import DecisionRecorder
from .ring import Subscription

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:9090"
STREAM_PATH = "/v1/decisions/stream"
STREAM_QUEUE = 5000  # records a stream may have waiting; beyond, dropped and counted
STREAM_INTERVAL = 0.1  # seconds between a stream's writes: batches, not a write per record
STREAM_BUFFER = 1 << 20  # bytes a stream may have unsent; beyond, events are dropped
METRICS_CONTENT_TYPE = CONTENT_TYPE


class HostCheck:
    """Which Host headers the endpoint answers: against DNS rebinding.

    A web page the operator opens can make the browser send requests to a
    name the page's author controls that resolves to 127.0.0.1 (or the
    pod), then read the answers as same-origin: the decisions, the UI. Such
    a request carries the author's name in Host. So only names we know are
    accepted: localhost, the bound address, and those configured; an IP
    literal is always accepted (no name to rebind: probes and Prometheus
    send the pod's IP), and so is a request without Host (not a browser).
    """

    def __init__(self, bound_host: str, extra: Iterable[str] = ()) -> None:
        names = {"localhost", bound_host.strip("[]").lower()}
        names.update(h.strip().lower().rstrip(".") for h in extra if h.strip())
        self.names = frozenset(names)

    def allows(self, host: str | None) -> bool:
        if host is None:
            return True
        name = host.strip().lower()
        if name.startswith("["):  # [v6]:port
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.rpartition(":")[0]
        name = name.rstrip(".")
        if name in self.names or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


class _Answer(Exception):
    """Raised by a route to answer at once (errors)."""

    def __init__(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class AdminServer:
    """The admin endpoint on background threads: start(), then stop()."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        recorder: DecisionRecorder | None = None,
        ready: Callable[[], bool] = lambda: True,
        *,
        heartbeat: float = 15.0,
        limits: HTTPLimits | None = None,
        metrics: Metrics | None = None,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.recorder = recorder
        # None: /metrics serves the process's own set, or every process's
        # under --workers (authz.observe.metrics.exposition); tests hand their own.
        self._metrics = metrics
        m = metrics or METRICS
        self._refused = m.admin_refused
        self._stream_dropped = m.trace_dropped.labels("stream")
        self.ready = ready
        self.heartbeat = heartbeat
        self.limits = limits or HTTPLimits()
        # Half the share for requests, half for streams: four query loops must
        # not starve the streams, nor twenty streams the probes and queries.
        self.budget = CpuBudget(self.limits.cpu_share / 2, metrics=m)
        self.stream_budget = CpuBudget(self.limits.cpu_share / 2, metrics=m)
        # Decisions as JSON, shared by every stream and list that sends them
        # (twenty readers of one record encode it once). Bounded: LRU.
        self._encoded: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._encoded_lock = threading.Lock()
        bound = parse_address(address)
        self.httpd = BoundedHTTPServer(bound, self._handle, self.limits, metrics=m)
        self.allowed_hosts = HostCheck(bound[0], allowed_hosts)
        self.streams = _StreamPump(self)

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
        self.httpd.start()
        self.streams.start()
        return self

    def stop(self) -> None:
        self.httpd.stop()
        self.streams.stop()  # closes open streams

    close = stop  # what `serve` calls on everything it started

    def is_ready(self) -> bool:
        try:
            return bool(self.ready())
        except Exception:
            log.exception("readiness check failed")
            return False

    # -- ordinary requests (worker threads) -----------------------------------

    def _handle(self, req: Request) -> None:
        url = urlsplit(req.target)
        path = url.path.rstrip("/") or "/"
        meter = self.budget.meter()
        try:
            if not self.allowed_hosts.allows(req.host):
                self._refused.labels("host").inc()
                raise _Answer(
                    HTTPStatus.MISDIRECTED_REQUEST,
                    {"error": "Host not accepted: use an IP address or localhost, or name "
                     "it in --admin-allowed-hosts"},
                )
            if path == "/healthz":
                self._text(req, HTTPStatus.OK, "ok\n")
            elif path == "/readyz":
                ready = self.is_ready()
                self._text(
                    req,
                    HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                    "ready\n" if ready else "not ready: no policy loaded yet\n",
                )
            elif path == "/metrics":
                body = exposition(self._metrics)
                self._send(req, HTTPStatus.OK, METRICS_CONTENT_TYPE, body)
            elif path == STREAM_PATH:
                self._open_stream(req, self._recorder(), _params(url.query), meter)
            elif path.startswith("/v1/decisions"):
                recorder = self._recorder()
                self._decisions(req, recorder, path, _params(url.query), meter)
            else:
                # The page (authz/ui): its static files and the views it reads.
                from ..ui.routes import answer

                page = answer(path, _params(url.query), self.recorder)
                if page is None:
                    raise _Answer(
                        HTTPStatus.NOT_FOUND, {"error": f"no such path: {url.path[:200]}"}
                    )
                self._send(req, page.status, page.content_type, page.body, page.headers)
        except _Answer as a:
            self._json(req, a.status, a.body)
        except QueryError as e:
            self._json(req, HTTPStatus.BAD_REQUEST, {"error": str(e)})
        finally:
            meter.done()

    def recorder_unsubscribe(self, sub: Subscription) -> None:
        if self.recorder is not None:
            self.recorder.ring.unsubscribe(sub)

    def _recorder(self) -> DecisionRecorder:
        if self.recorder is None:
            raise _Answer(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "decision recording is off"})
        return self.recorder

    def _decisions(
        self,
        req: Request,
        recorder: DecisionRecorder,
        path: str,
        params: dict[str, list[str]],
        meter: Meter,
    ) -> None:
        if path == "/v1/decisions":
            query = _query(params, MAX_LIMIT)
            found: list[str] = []
            for i, rec in enumerate(recorder.ring.newest_first()):
                if query.matches(rec):
                    found.append(self._encode(rec))
                    if len(found) >= query.limit:
                        break
                if not i & 63:
                    meter.tick()
            body = (
                '{"decisions":[' + ",".join(found) + f'],"count":{len(found)},'
                f'"buffered":{len(recorder.ring)},"capacity":{recorder.ring.capacity},'
                f'"limit":{query.limit}}}\n'
            )
            self._send(req, HTTPStatus.OK, "application/json", body.encode())
            return
        decision_id = unquote(path.removeprefix("/v1/decisions/"))
        found_rec = recorder.ring.find(decision_id)
        if found_rec is None:
            raise _Answer(
                HTTPStatus.NOT_FOUND,
                {
                    "error": f"decision {decision_id[:64]} is not in the buffer (too old, "
                    "from another replica, or never recorded)"
                },
            )
        self._send(
            req, HTTPStatus.OK, "application/json", (self._encode(found_rec) + "\n").encode()
        )

    def _encode(self, rec: DecisionRecord) -> str:
        key = rec.decision.decision_id
        with self._encoded_lock:
            text = self._encoded.get(key)
        if text is None:
            text = detail_json(rec)
            with self._encoded_lock:
                self._encoded[key] = text
                if len(self._encoded) > 2048:
                    self._encoded.popitem(last=False)
        return text

    # -- streams: opened on a worker, then served by the pump ---------------

    def _open_stream(
        self,
        req: Request,
        recorder: DecisionRecorder,
        params: dict[str, list[str]],
        meter: Meter,
    ) -> None:
        """Server-sent events: replay from `since` if given, then live decisions."""
        query = _query(params, None)
        if len(self.streams) >= self.limits.max_streams:
            self._refused.labels("streams-full").inc()
            self._send(
                req,
                HTTPStatus.SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                f"too many open streams (at most {self.limits.max_streams})\n".encode(),
                {"Retry-After": "5"},
            )
            return
        stream = _Stream(req, recorder.ring.subscribe(STREAM_QUEUE), query, "limit" in params)
        head = response_head(
            HTTPStatus.OK,
            {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"},
        )
        req.send(head + b": stream open\n\n", self.limits.write_timeout)
        if query.since_unix_ns is not None:
            # Subscribed before the snapshot, so a record appended in between
            # is both replayed and queued: skip it the second time.
            out: list[str] = []
            for i, rec in enumerate(recorder.ring.snapshot()):
                if query.matches(rec):
                    out.append(self._event(rec))
                    stream.replayed.add(rec.decision.decision_id)
                    stream.sent += 1
                    if stream.done:
                        break
                if not i & 63:
                    meter.tick()
            if out:
                req.send("".join(out).encode(), self.limits.write_timeout)
        if stream.done:
            recorder.ring.unsubscribe(stream.sub)
            return
        req.detach()
        self.streams.add(stream)

    def _event(self, rec: DecisionRecord) -> str:
        return f"id: {rec.decision.decision_id}\nevent: decision\ndata: {self._encode(rec)}\n\n"

    # -- answering -----------------------------------------------------------

    def _json(self, req: Request, status: HTTPStatus, body: Any) -> None:
        data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        self._send(req, status, "application/json", data)

    def _text(self, req: Request, status: HTTPStatus, text: str) -> None:
        self._send(req, status, "text/plain; charset=utf-8", text.encode())

    def _send(
        self,
        req: Request,
        status: HTTPStatus,
        content_type: str,
        body: bytes,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        head = response_head(
            status,
            {"Content-Type": content_type, "Content-Length": str(len(body)), **(extra or {})},
        )
        req.send(head if req.method == "HEAD" else head + body, self.limits.write_timeout)


class _Stream:
    """One open event stream, served by the pump."""

    def __init__(self, req: Request, sub: Subscription, query: DecisionQuery, limited: bool):
        self.req = req
        self.sock = req.sock
        self.sub = sub
        self.query = query
        self.limited = limited
        self.sent = 0
        self.replayed: set[str] = set()
        self.buf = bytearray()
        self.last_write = self.last_progress = time.monotonic()

    @property
    def done(self) -> bool:
        return self.limited and self.sent >= self.query.limit


class _StreamPump:
    """Every open stream, served by one thread waking STREAM_INTERVAL apart.

    One thread, not one per client: twenty readers cost ten wake-ups a second
    (each a GIL hand-over the Check threads would feel), and the sockets are
    written without blocking. A reader that takes nothing for
    `write_timeout` is closed; one that falls behind by STREAM_BUFFER bytes
    loses events, counted in egress_authz_trace_records_dropped_total{sink="stream"}.
    """

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self._streams: list[_Stream] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: _Stream) -> None:
        stream.sock.setblocking(False)
        with self._lock:
            self._streams.append(stream)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="admin-streams", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            streams, self._streams = self._streams, []
        for st in streams:
            self._close(st)

    def _run(self) -> None:
        while not self._stop.wait(STREAM_INTERVAL):
            with self._lock:
                streams = list(self._streams)
            if not streams:
                continue
            meter = self.admin.stream_budget.meter()
            for st in streams:
                try:
                    keep = self._serve(st, meter)
                except OSError:
                    keep = False
                if not keep:
                    with self._lock:
                        self._streams.remove(st)
                    self._close(st)
            meter.done()

    def _serve(self, st: _Stream, meter: Meter) -> bool:
        """Queue what is new for one stream and write what the socket takes."""
        now = time.monotonic()
        recs = st.sub.take()
        query = st.query
        for i, rec in enumerate(recs):
            if st.done:
                break
            if rec.decision.decision_id in st.replayed or not query.matches(rec):
                continue
            if len(st.buf) >= STREAM_BUFFER:
                st.sub.dropped += 1
                self.admin._stream_dropped.inc()
                continue
            st.buf += self.admin._event(rec).encode()
            st.sent += 1
            if not i & 63:
                meter.tick()
        if not st.buf and now - st.last_write >= self.admin.heartbeat:
            # A heartbeat keeps proxies from closing an idle stream and is
            # how a vanished client is noticed (the write fails).
            st.buf += b": keepalive\n\n"
        if st.buf:
            try:
                n = st.sock.send(st.buf)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n:
                del st.buf[:n]
                st.last_write = st.last_progress = now
            elif now - st.last_progress > self.admin.limits.write_timeout:
                log.debug("decision stream %s: client stopped reading", st.req.peer)
                return False
        else:
            st.last_progress = now
        return not (st.done and not st.buf)

    def _close(self, st: _Stream) -> None:
        self.admin.recorder_unsubscribe(st.sub)
        with contextlib.suppress(OSError):
            st.sock.close()


def _params(query: str) -> dict[str, list[str]]:
    try:
        return parse_qs(query, keep_blank_values=True, max_num_fields=32)
    except ValueError as e:  # over max_num_fields: an answer, not a traceback in the log
        raise _Answer(HTTPStatus.BAD_REQUEST,
                      {"error": "too many query parameters (at most 32)"}) from e


def _query(params: dict[str, list[str]], max_limit: int | None) -> DecisionQuery:
    try:
        return DecisionQuery.from_params(params, max_limit)
    except QueryError as e:
        raise _Answer(HTTPStatus.BAD_REQUEST, {"error": str(e)}) from e


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:9090', '[::1]:9090', ':9090' (127.0.0.1), '0.0.0.0:9090'."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad admin address {text!r}: use HOST:PORT, e.g. {DEFAULT_ADDRESS}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)
