"""Kubernetes Events about policy ConfigMaps: aggregated, and posted off the watch threads.

Beside the data flow: the Kubernetes source calls `record()` while it validates
ConfigMaps, under its own lock; `record()` only queues. One background thread
posts, as kopf's posting queue does, so a slow or unreachable Events API never
holds up a policy update. Repeats are folded the way client-go's event recorder
folds them (EventCorrelator): the same object, type, reason and message within
`window` seconds bump the existing Event's `count` and `lastTimestamp` with a
PATCH instead of creating another Event; past `max_similar` different messages
for one object and reason, the rest share one "(combined from similar events)"
Event. Repeats that arrive while a post is pending are coalesced into it, and
one Event is written at most once per `min_interval`, so churn costs a bounded
number of objects and API calls, with the true count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .client import KubeApi, KubeError, KubeNotFound, Obj

log = logging.getLogger(__name__)

MAX_MESSAGE = 4000  # the API server caps Event messages; say where the rest is
COMBINED_PREFIX = "(combined from similar events): "

# (namespace, name, uid, type, reason, message): one Event object per key and window.
Key = tuple[str, str, str, str, str, str]


@dataclass(frozen=True)
class EventSettings:
    """How Events are folded and paced; the defaults are client-go's where it has one."""

    window: float = 600.0
    """Seconds within which a repeat updates the existing Event (client-go: 10 minutes)."""
    max_similar: int = 10
    """Distinct messages per object and reason before they are combined (client-go: 10)."""
    min_interval: float = 1.0
    """Shortest time between two writes of one Event; repeats meanwhile only add to its count."""
    max_pending: int = 1000
    """Queued Events beyond this are dropped (and counted): the queue is never unbounded."""
    max_remembered: int = 4096
    """Events remembered for aggregation (oldest forgotten first)."""


@dataclass
class _Seen:
    name: str  # the Event object's name
    count: int  # as last written
    first: str  # firstTimestamp
    last_write: float  # monotonic
    expires: float  # monotonic: past this a repeat starts a new Event


@dataclass
class _Pending:
    involved: Obj
    type: str
    reason: str
    message: str
    count: int
    last: str


class EventRecorder:
    """Queue Events on ConfigMaps; a daemon thread posts them until stop()."""

    def __init__(self, api: KubeApi, *, component: str, instance: str,
                 settings: EventSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api, self.component, self.instance = api, component, instance
        self.settings = settings or EventSettings()
        self.clock = clock
        self.created = 0  # Event objects created
        self.patched = 0  # count updates written to existing Events
        self.dropped = 0  # occurrences lost to a full queue
        self.failed = 0  # API calls that failed (logged)
        self._lock = threading.Lock()  # guards the queue only; never held during a call
        self._pending: OrderedDict[Key, _Pending] = OrderedDict()
        self._seen: OrderedDict[Key, _Seen] = OrderedDict()  # posting thread only
        self._similar: dict[tuple[str, str, str, str, str], tuple[float, set[str]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ producers

    def record(self, involved: Obj, type_: str, reason: str, message: str) -> None:
        """Queue one occurrence; cheap and non-blocking, safe under any caller's lock."""
        meta = involved.get("metadata", {})
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 40] + "\n... (see egress-authz lint)"
        ns, name, uid = (str(meta.get("namespace") or "default"), str(meta.get("name") or ""),
                         str(meta.get("uid") or ""))
        now = _timestamp()
        with self._lock:
            folded = self._aggregate((ns, name, uid, type_, reason), message)
            if folded == COMBINED_PREFIX:
                message = COMBINED_PREFIX + message  # the Event shows the latest one
            key: Key = (ns, name, uid, type_, reason, folded)
            pending = self._pending.get(key)
            if pending is not None:
                pending.count += 1
                pending.last, pending.message = now, message
                pending.involved = involved  # the newest resourceVersion
            elif len(self._pending) >= self.settings.max_pending:
                self.dropped += 1
                return
            else:
                self._pending[key] = _Pending(involved, type_, reason, message, 1, now)
            self._idle.clear()
        self._wake.set()

    def _aggregate(self, similar: tuple[str, str, str, str, str], message: str) -> str:
        """The message part of the key (lock held): the message itself, or, past
        max_similar different messages for one object and reason within the window,
        COMBINED_PREFIX for all of them (client-go's EventAggregator)."""
        now = self.clock()
        started, messages = self._similar.get(similar, (now, set()))
        if now - started > self.settings.window:
            started, messages = now, set()
        if message not in messages:
            if len(messages) >= self.settings.max_similar:
                return COMBINED_PREFIX
            messages.add(message)
        self._similar[similar] = (started, messages)
        if len(self._similar) > self.settings.max_remembered:
            self._similar.pop(next(iter(self._similar)))
        return message

    # ------------------------------------------------------------ lifecycle

    def start(self) -> EventRecorder:
        self._thread = threading.Thread(target=self._run, name="kube events", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far was posted (tests, shutdown)."""
        return self._idle.wait(timeout)

    # ------------------------------------------------------------ the posting thread

    def _run(self) -> None:
        while not self._stop.is_set():
            item, wait = self._next()
            if item is None:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            key, pending = item
            try:
                self._post(key, pending)
            except KubeError as e:  # the source logged the problem itself; an Event is a courtesy
                self.failed += 1
                log.warning("could not post %s Event on %s/%s: %s", pending.reason,
                            key[0], key[1], e)
            except Exception:  # a bug here must not end the thread
                self.failed += 1
                log.exception("posting an Event failed")

    def _next(self) -> tuple[tuple[Key, _Pending] | None, float | None]:
        """The first queued Event that may be written now, else how long to wait."""
        now = self.clock()
        with self._lock:
            soonest: float | None = None
            for key, pending in self._pending.items():
                seen = self._seen.get(key)
                due = seen.last_write + self.settings.min_interval if seen else now
                if due <= now:
                    del self._pending[key]
                    return (key, pending), None
                soonest = due if soonest is None else min(soonest, due)
            if not self._pending:
                self._idle.set()
            return None, (soonest - now if soonest is not None else None)

    def _post(self, key: Key, p: _Pending) -> None:
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now < seen.expires:
            try:
                self.api.patch("Event", key[0], seen.name, {
                    "count": seen.count + p.count, "lastTimestamp": p.last,
                    "message": p.message})
                seen.count += p.count
                seen.last_write = now
                self.patched += 1
                return
            except KubeNotFound:
                pass  # Events expire (the API server's TTL, 1 h by default): start a new one
        meta = p.involved.get("metadata", {})
        first = seen.first if seen is not None and now < seen.expires else p.last
        name = f"{meta.get('name')}.{time.time_ns():x}"  # client-go names Events the same way
        self.api.create("Event", key[0], {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": name, "namespace": key[0]},
            "involvedObject": {"apiVersion": "v1", "kind": "ConfigMap",
                               "name": meta.get("name"), "namespace": key[0],
                               "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": p.type, "reason": p.reason, "message": p.message,
            "source": {"component": self.component}, "reportingComponent": self.component,
            "reportingInstance": self.instance, "firstTimestamp": first,
            "lastTimestamp": p.last, "count": p.count,
        })
        self.created += 1
        self._seen[key] = _Seen(name, p.count, first, now, now + self.settings.window)
        self._seen.move_to_end(key)
        while len(self._seen) > self.settings.max_remembered:
            self._seen.popitem(last=False)


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
