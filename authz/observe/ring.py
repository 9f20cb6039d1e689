"""The recent decisions the admin endpoint serves, shared fairly between sources.

`DecisionRecorder.record()` appends each (bounded) record here on the Check
path; the admin endpoint reads snapshots and live subscribers get batches
from the recorder's thread.

Fair share: the ring holds at most `size` records; when it is full, the
oldest record of the source holding the most is evicted (within an eighth,
for sources of more than eight records). A caller flooding
Checks therefore only ever evicts its own decisions once it holds more than
anyone else: every other source keeps at least an equal share. A source is
the namespace of the Pod the caller's address resolved to; callers with no
resolved Pod (no workload index, an unknown address, a forged request) share
one bucket, so inventing namespaces in forged principals buys nothing.
Records evicted from a source holding more than an equal share are counted
in `egress_authz_trace_records_dropped_total{sink="ring-share"}`.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
from collections.abc import Iterator, Sequence

from ..records import DecisionRecord
from .metrics import METRICS, Metrics

UNRESOLVED = ""  # the one bucket of callers without a resolved Pod


def source_of(rec: DecisionRecord) -> str:
    """The fair-share key: the resolved Pod's namespace, else the shared bucket."""
    ident = rec.identity
    workload = ident.workload if ident is not None else None
    return workload.namespace if workload is not None else UNRESOLVED


class Subscription:
    """One live reader (an SSE client); a slow reader loses records, never blocks.

    The recorder hands over whole batches (one call per batch, not per record
    and reader); the reader takes everything pending at once.
    """

    def __init__(self, size: int = 1000, metrics: Metrics | None = None) -> None:
        self.size = size
        self._dropped = (metrics or METRICS).trace_dropped.labels("stream")
        self.dropped = 0
        self._batches: collections.deque[Sequence[DecisionRecord]] = collections.deque()
        self._pending = 0
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def offer(self, batch: Sequence[DecisionRecord]) -> None:
        with self._lock:
            room = self.size - self._pending
            if room < len(batch):
                lost = len(batch) - max(0, room)
                self.dropped += lost
                self._dropped.inc(lost)
                batch = batch[: max(0, room)]
            if batch:
                self._batches.append(batch)
                self._pending += len(batch)
        self.ready.set()

    def take(self) -> list[DecisionRecord]:
        """Everything pending, oldest first."""
        with self._lock:
            self.ready.clear()
            out = [rec for batch in self._batches for rec in batch]
            self._batches.clear()
            self._pending = 0
        return out

    def qsize(self) -> int:
        return self._pending


class RingBuffer:
    """The last `size` records over all sources, newest last, shared fairly."""

    def __init__(self, size: int, metrics: Metrics | None = None) -> None:
        self._capacity = max(1, size)
        self.metrics = metrics or METRICS
        self._share_dropped = self.metrics.trace_dropped.labels("ring-share")
        self._seq = itertools.count()
        self._by_source: dict[str, collections.deque[tuple[int, DecisionRecord]]] = {}
        # Whom to evict, kept up to date in O(1) per append: `_victim` holds at
        # least as many records as any other source, and `_second` is at least
        # what any other source holds. Only when an eviction takes the victim
        # below `_second` are the sources scanned again (never in the common
        # cases: one source, or one flooding).
        self._victim: str | None = None
        self._second = 0
        self._total = 0
        self._lock = threading.Lock()
        self._subscribers: set[Subscription] = set()

    def __len__(self) -> int:
        return self._total

    @property
    def capacity(self) -> int:
        return self._capacity

    def held_by(self, source: str) -> int:
        """How many records `source` holds now."""
        dq = self._by_source.get(source)
        return len(dq) if dq is not None else 0

    def append(self, rec: DecisionRecord, source: str | None = None) -> None:
        key = source_of(rec) if source is None else source
        with self._lock:
            dq = self._by_source.get(key)
            if dq is None:
                dq = self._by_source[key] = collections.deque()
            dq.append((next(self._seq), rec))
            victim = self._victim
            if victim is None:
                self._victim = key
            elif key != victim:
                n = len(dq)
                held = len(self._by_source[victim])
                if n > held:
                    self._victim, self._second = key, held
                elif n > self._second:
                    self._second = n
            if self._total < self._capacity:
                self._total += 1
                return
            # Full: evict the victim's oldest (inline: this is the Check path).
            victim = self._victim or key
            vq = self._by_source[victim]
            vq.popleft()
            left = len(vq)
            if not left:
                del self._by_source[victim]
            sources = len(self._by_source)
            # Still above an equal share after the eviction: a flood, not
            # turnover (a lone source holding the whole ring is not counted).
            if sources > 1 and left > self._capacity // sources:
                self._share_dropped.inc()
            # A little slack on large sources, so that many sources of equal
            # size do not cost a scan per eviction; exact when sources are small.
            second = self._second
            if left < second - (second >> 3) or not left:
                self._rescan()

    def _rescan(self) -> None:
        top = heapq.nlargest(2, self._by_source.items(), key=_size_of)
        self._victim = top[0][0] if top else None
        self._second = len(top[1][1]) if len(top) > 1 else 0

    def _copies(self) -> list[list[tuple[int, DecisionRecord]]]:
        # list(deque) is one C call per source: the lock (which record() takes
        # on the Check path) is held for microseconds, not a Python loop.
        with self._lock:
            return [list(dq) for dq in self._by_source.values()]

    def snapshot(self) -> list[DecisionRecord]:
        """A copy, oldest first."""
        copies = self._copies()
        if len(copies) == 1:
            return [rec for _, rec in copies[0]]
        items = [item for copy in copies for item in copy]
        items.sort(key=_seq_of)
        return [rec for _, rec in items]

    def newest_first(self) -> Iterator[DecisionRecord]:
        """The records newest first, merged lazily: a reader that stops after N
        records (a list with a limit) touches about N of them, not the whole ring."""
        copies = self._copies()
        if len(copies) == 1:
            return (rec for _, rec in reversed(copies[0]))
        merged = heapq.merge(*(reversed(c) for c in copies), key=_seq_of, reverse=True)
        return (rec for _, rec in merged)

    def find(self, decision_id: str) -> DecisionRecord | None:
        for copy in self._copies():
            for _, rec in reversed(copy):
                if rec.decision.decision_id == decision_id:
                    return rec
        return None

    def subscribe(self, size: int = 1000) -> Subscription:
        sub = Subscription(size, self.metrics)
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def publish(self, batch: Sequence[DecisionRecord]) -> None:
        """Hand records to every live subscriber (called off the Check path)."""
        if not self._subscribers or not batch:
            return
        with self._lock:
            subs = list(self._subscribers)
        for sub in subs:
            sub.offer(batch)


def _seq_of(item: tuple[int, DecisionRecord]) -> int:
    return item[0]


def _size_of(item: tuple[str, collections.deque[tuple[int, DecisionRecord]]]) -> int:
    return len(item[1])
