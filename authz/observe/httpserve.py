"""A small HTTP/1.0 GET server whose cost is bounded whatever its clients do.

The admin endpoint (authz/observe/admin.py) runs on it, in the same process as the
Check path, so everything it can be made to spend is capped:

- one thread accepts connections and reads request heads without blocking:
  a connection costs a socket and a few bytes until its head is complete,
  never a thread; a head not complete within `head_timeout` is answered 408
  and closed; at most `max_connections` wait at once, and a new one closes
  the oldest waiting (so a flood of idle connections cannot lock out a
  probe that sends its request at once);
- complete requests go to `workers` threads through a queue of `backlog`;
  beyond it they are answered 503 at once;
- a handler may keep its connection (`Request.detach()`) for a long-lived
  stream, served by its owner without a thread of its own (authz/observe/admin.py
  serves every event stream from one thread, at most `max_streams`);
- every answer must be written within `write_timeout`;
- `CpuBudget` caps the CPU time the handlers spend, in all threads together,
  to a share of one core: in Python that time is GIL time the Check threads
  cannot have.

The standard library's ThreadingHTTPServer spends a thread per connection
for as long as the client likes, which is why it is not used; the request
line is all the admin endpoint needs of HTTP, so it is parsed here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

from .metrics import METRICS, Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """What one admin endpoint may hold (docs/security.md, "The service's own exposure")."""

    max_connections: int = 64
    """Connections waiting for their request head; a new one closes the oldest."""
    head_timeout: float = 5.0
    """Seconds a client has to send its whole request head (slowloris)."""
    max_head_bytes: int = 8192
    """Longest request head; beyond it, 431."""
    workers: int = 4
    """Threads answering ordinary requests."""
    backlog: int = 16
    """Complete requests waiting for a worker; beyond it, 503."""
    max_streams: int = 32
    """Concurrent event streams; beyond it, 503."""
    write_timeout: float = 10.0
    """Seconds to send a whole answer, or one write of a stream."""
    cpu_share: float = 0.05
    """Share of one CPU the handlers may use together, on average (CpuBudget):
    half for requests, half for streams."""


class CpuBudget:
    """A token bucket of thread CPU time shared by every handler thread.

    Handlers call `Meter.tick()` as they go; once the bucket is empty, the
    thread sleeps until its debt is paid back at `share` seconds per second.
    The GIL is released while sleeping, so admin work can take at most about
    `share` of the interpreter's time, however many clients ask.
    """

    def __init__(
        self, share: float = 0.05, burst: float = 0.02, metrics: Metrics | None = None
    ) -> None:
        self._cpu = (metrics or METRICS).admin_cpu
        self.share = max(1e-3, share)
        self.burst = burst
        self._tokens = burst
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self.waited = 0.0  # seconds handlers slept for the budget (tests, bench)

    def charge(self, seconds: float) -> None:
        """Record `seconds` of work; sleep while the bucket is in debt (anyone's)."""
        self._cpu.inc(seconds)
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.share)
                self._last = now
                self._tokens -= seconds
                seconds = 0.0  # charged once; later rounds only wait
                debt = -self._tokens
            if debt <= 0:
                time.sleep(0)  # hand the GIL over anyway: a Check may be waiting
                return
            # Other threads may add to the debt meanwhile: look again after
            # sleeping, so that all of them together stay within `share`.
            pause = debt / self.share
            self.waited += pause
            time.sleep(pause)

    def meter(self) -> Meter:
        return Meter(self)


class Meter:
    """One thread's running account with a CpuBudget."""

    SLICE = 0.0005  # seconds of work between charges (and GIL hand-overs)

    def __init__(self, budget: CpuBudget) -> None:
        self.budget = budget
        self._since = time.thread_time()

    def tick(self) -> None:
        used = time.thread_time() - self._since
        if used >= self.SLICE:
            self.budget.charge(used)
            self._since = time.thread_time()

    def done(self) -> None:
        used = time.thread_time() - self._since
        if used > 0:
            self.budget.charge(used)
        self._since = time.thread_time()


class Request:
    """A complete request head, and the connection to answer it on."""

    def __init__(
        self, sock: socket.socket, peer: str, method: str, target: str, host: str | None = None
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.method = method
        self.target = target
        self.host = host  # the Host header as sent (None when absent)
        self.detached = False

    def detach(self) -> socket.socket:
        """Keep the connection open after the handler returns: the caller owns it now."""
        self.detached = True
        return self.sock

    def send(self, data: bytes, timeout: float) -> None:
        """Write all of `data` within `timeout` seconds, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("client too slow to read")
            self.sock.settimeout(left)
            sent = self.sock.send(view[:65536])
            view = view[sent:]


def _host_header(head: bytes) -> str | None:
    """The Host header's value in a request head (the first one), or None."""
    for raw in head.split(b"\n")[1:]:
        name, sep, value = raw.partition(b":")
        if sep and name.strip().lower() == b"host":
            return value.strip().decode("latin-1")
    return None


def response_head(status: HTTPStatus, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.0 {status.value} {status.phrase}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def simple_response(status: HTTPStatus, text: str, extra: dict[str, str] | None = None) -> bytes:
    body = text.encode()
    headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(body))}
    headers.update(extra or {})
    return response_head(status, headers) + body


class _Pending:
    __slots__ = ("buf", "deadline", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: str, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = b""
        self.deadline = deadline


class BoundedHTTPServer:
    """Accepts on `address`; `handle(request)` answers each request on a worker thread."""

    def __init__(
        self,
        address: tuple[str, int],
        handle: Callable[[Request], None],
        limits: HTTPLimits,
        metrics: Metrics | None = None,
    ) -> None:
        self.limits = limits
        self._refused = (metrics or METRICS).admin_refused
        self._handle = handle
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._queue: queue.Queue[Request | None] = queue.Queue(maxsize=limits.backlog)
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        acceptor = threading.Thread(target=self._accept_loop, name="admin-accept", daemon=True)
        self._threads.append(acceptor)
        for i in range(self.limits.workers):
            self._threads.append(
                threading.Thread(target=self._work, name=f"admin-worker-{i}", daemon=True)
            )
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(5)
        self._threads = []
        self.close()

    def close(self) -> None:
        for p in self._pending.values():
            p.sock.close()
        self._pending.clear()
        while True:  # requests no worker took before stopping
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                request.sock.close()
        self.socket.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    @property
    def waiting_connections(self) -> int:
        return len(self._pending)

    # -- the accepting thread ------------------------------------------------

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.socket, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.stopping.is_set():
                timeout = 0.25
                if self._pending:
                    first = next(iter(self._pending.values()))
                    timeout = max(0.0, min(timeout, first.deadline - time.monotonic()))
                for key, _ in sel.select(timeout):
                    if key.data == "listen":
                        self._accept(sel)
                    elif key.data == "wake":
                        return
                    else:
                        self._read(sel, key.data)
                self._expire(sel)
        finally:
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(64):  # then look at the others again
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: keep serving those we have
                log.warning("admin endpoint: accept failed: %s", e)
                return
            sock.setblocking(False)
            if len(self._pending) >= self.limits.max_connections:
                _, oldest = self._pending.popitem(last=False)
                self._drop(sel, oldest, "too-many-connections", None)
            p = _Pending(sock, str(addr[0]), time.monotonic() + self.limits.head_timeout)
            self._pending[sock.fileno()] = p
            sel.register(sock, selectors.EVENT_READ, p)

    def _read(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        try:
            chunk = p.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._forget(sel, p)
            p.sock.close()
            return
        p.buf += chunk
        end = p.buf.find(b"\r\n\r\n")
        if end < 0:
            end = p.buf.find(b"\n\n")
        if end < 0:
            if len(p.buf) > self.limits.max_head_bytes:
                self._forget(sel, p)
                self._drop(
                    sel,
                    p,
                    "head-too-large",
                    simple_response(
                        HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large\n"
                    ),
                )
            return
        self._forget(sel, p)
        line = p.buf.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/") or end > self.limits.max_head_bytes:
            self._drop(
                sel, p, "bad-request", simple_response(HTTPStatus.BAD_REQUEST, "bad request\n")
            )
            return
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            self._drop(
                sel,
                p,
                "method",
                simple_response(HTTPStatus.METHOD_NOT_ALLOWED, "only GET\n", {"Allow": "GET"}),
            )
            return
        request = Request(p.sock, p.peer, method, target, _host_header(p.buf[:end]))
        p.sock.setblocking(True)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            p.sock.setblocking(False)
            self._drop(
                sel,
                p,
                "busy",
                simple_response(
                    HTTPStatus.SERVICE_UNAVAILABLE, "busy, retry\n", {"Retry-After": "1"}
                ),
            )

    def _forget(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        self._pending.pop(p.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(p.sock)

    def _drop(
        self, sel: selectors.BaseSelector, p: _Pending, reason: str, answer: bytes | None
    ) -> None:
        """Close a connection we will not serve, with a best-effort short answer."""
        self._refused.labels(reason).inc()
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(p.sock)
        if answer is not None:
            with contextlib.suppress(OSError):
                p.sock.send(answer)  # non-blocking: whatever fits in the socket buffer
        p.sock.close()

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        while self._pending:
            first = next(iter(self._pending.values()))
            if first.deadline > now:
                return
            self._forget(sel, first)
            self._drop(
                sel,
                first,
                "head-timeout",
                simple_response(HTTPStatus.REQUEST_TIMEOUT, "request head not received in time\n"),
            )

    # -- handler threads ------------------------------------------------------

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                request = self._queue.get(timeout=0.25)
            except queue.Empty:
                continue
            if request is None:
                return
            if self.stopping.is_set():
                request.sock.close()
                return
            self._serve(request)

    def _serve(self, request: Request) -> None:
        try:
            self._handle(request)
        except (OSError, TimeoutError) as e:
            log.debug("admin client %s: %s", request.peer, e)
        except Exception:
            log.exception("admin request %s failed", request.target[:200])
        finally:
            if not request.detached:
                with contextlib.suppress(OSError):
                    request.sock.close()
