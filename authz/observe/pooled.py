"""One pod's observability under `serve --workers N`: every worker's, served once.

The supervisor (authz/envoy/workers.py) holds no gRPC state, so it is where
the pod's one admin endpoint runs:

- metrics: prometheus-client's multiprocess mode. `PodObservability`
  makes a temporary directory of the pod's own and sets
  PROMETHEUS_MULTIPROC_DIR before any process imports authz.observe.metrics; the
  workers inherit it, each keeps its values in files there, and /metrics
  adds them up (authz.observe.metrics.exposition). A replaced worker's live gauges
  are let go (`mark_process_dead`); its counts stay, so totals never drop.
- decisions: each worker's recorder hands its records, in batches, to the
  supervisor over a datagram socket pair (`RecordForwarder`), off the Check
  path and never waiting: a full socket drops the batch, counted under
  sink="forward". The supervisor (`RecordCollector`) puts them in one ring
  buffer, with the same fair share per namespace, record bounds (applied in
  the worker before forwarding) and live subscribers as a single process,
  and the admin endpoint serves it with its usual limits.

Datagrams keep batches whole (no framing to get wrong, no partial writes);
pickle is safe here because both ends are this program, started by the
supervisor, on a socket pair no one else holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import selectors
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..records import DecisionRecord

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

# authz.observe.metrics.MULTIPROC_ENV, not imported: this module must not load
# prometheus-client before the directory is set (PodObservability).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_DATAGRAM = 60 * 1024  # well under the socket buffer: a datagram must fit whole
SOCKET_BUFFER = 4 << 20  # what a worker may have in flight (the kernel may cap it)


class RecordForwarder:
    """The worker's end: send batches of recorded decisions to the supervisor."""

    def __init__(self, fd: int, metrics: Metrics | None = None) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        if metrics is None:  # the worker's own set (serve hands its recorder's)
            from .metrics import METRICS

            metrics = METRICS
        self._dropped = metrics.trace_dropped.labels("forward")

    def __call__(self, batch: Sequence[DecisionRecord]) -> None:
        self._send(list(batch))

    def _send(self, batch: list[DecisionRecord]) -> None:
        if not batch:
            return
        try:
            data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an unpicklable field: lose these, never the recorder
            log.exception("cannot forward %d decision records", len(batch))
            self._dropped.inc(len(batch))
            return
        if len(data) > MAX_DATAGRAM:
            if len(batch) == 1:
                self._dropped.inc()
                return
            half = len(batch) // 2
            self._send(batch[:half])
            self._send(batch[half:])
            return
        try:
            self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            self._dropped.inc(len(batch))  # the supervisor is behind: never wait
        except OSError:
            self._dropped.inc(len(batch))  # the supervisor is gone: we are stopping

    def close(self) -> None:
        self.sock.close()


class RecordCollector:
    """The supervisor's end: one thread reading every worker's socket into one ring."""

    def __init__(self, ring: object) -> None:
        from .ring import RingBuffer, source_of

        assert isinstance(ring, RingBuffer)
        self.ring = ring
        self._source_of = source_of
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="egress-authz-collect", daemon=True)
        self.received = 0

    def channel(self) -> tuple[socket.socket, int]:
        """A new socket pair: (the supervisor's end, registered here; the fd to hand a worker)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        mine.setblocking(False)
        with self._lock:
            self._sel.register(mine, selectors.EVENT_READ, mine)
        self._wake_w.send(b"x")
        fd = theirs.detach()
        return mine, fd

    def release(self, mine: socket.socket) -> None:
        """Stop reading a replaced worker's socket (after what it sent is read)."""
        self._drain_socket(mine)
        with self._lock, contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(mine)
        mine.close()

    def start(self) -> RecordCollector:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()
        self._wake_w.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(1.0):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                self._drain_socket(key.data)

    def _drain_socket(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(MAX_DATAGRAM + 1024)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            try:
                batch: list[DecisionRecord] = pickle.loads(data)
            except Exception:
                log.exception("a worker sent an unreadable batch of decisions")
                continue
            for rec in batch:
                self.ring.append(rec, self._source_of(rec))
            self.ring.publish(batch)
            self.received += len(batch)


class PodObservability:
    """The supervisor's side: the metrics directory, the record collector, the admin endpoint."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="egress-authz-")
        self.metrics_dir = os.path.join(self.directory, "metrics")
        os.mkdir(self.metrics_dir)
        if "prometheus_client.values" in sys.modules and MULTIPROC_ENV not in os.environ:
            # prometheus-client picks its storage when first imported: the
            # supervisor's own counters (admin) would then stay out of /metrics.
            log.warning("prometheus_client imported before the multiprocess directory was set")
        os.environ[MULTIPROC_ENV] = self.metrics_dir
        self.collector: RecordCollector | None = None
        self.admin: object | None = None

    def start_admin(self, address: str, ring_size: int, ready: object,
                    max_streams: int, allowed_hosts: Sequence[str]) -> object:
        """The pod's admin endpoint over the collected ring (raises OSError/ValueError)."""
        from .admin import AdminServer
        from .httpserve import HTTPLimits
        from .recorder import DecisionRecorder, TracingSettings

        # A recorder used only for its ring (never records: the workers count
        # and log their own decisions); the UI's views read it the same way.
        holder = DecisionRecorder(TracingSettings(ring_size=ring_size, decision_log=False))
        self.collector = RecordCollector(holder.ring).start()
        admin = AdminServer(
            address, holder, ready,  # type: ignore[arg-type]
            limits=HTTPLimits(max_streams=max_streams), allowed_hosts=allowed_hosts,
        )
        admin.start()
        self.admin = admin
        return admin

    def worker_gone(self, pid: int) -> None:
        """A worker exited: its live gauges no longer count."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()  # type: ignore[attr-defined]
        if self.collector is not None:
            self.collector.close()
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(self.directory, ignore_errors=True)
