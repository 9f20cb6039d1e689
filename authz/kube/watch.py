"""Robust list+watch of one kind: the loop every Kubernetes input of the service runs on.

List, hand the full list over, then watch from the list's resourceVersion (with
bookmarks, so a quiet watch still advances). A dropped connection re-watches from the
last resourceVersion seen; 410 Gone lists again; errors back off exponentially with
jitter, never a hot loop. While the API server is unreachable nothing is handed over,
so consumers keep serving their last state.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from ..observe.metrics import METRICS, Metrics
from .client import KubeApi, KubeError, KubeGone, KubeUnreachable, Obj

log = logging.getLogger(__name__)


class Backoff:
    """Exponential backoff with jitter: delays in [d/2, d], d doubling up to `cap`."""

    def __init__(self, base: float = 0.2, cap: float = 10.0) -> None:
        self.base, self.cap = base, cap
        self._attempt = 0

    def next(self) -> float:
        d = min(self.cap, self.base * (2 ** self._attempt))
        self._attempt += 1
        return random.uniform(d / 2, d)

    def reset(self) -> None:
        self._attempt = 0


class ApiHealth:
    """Whether the API server answered last time, shared by every reflector of a process.

    It also carries the metrics those reflectors update (`metrics`; the
    process's own set unless a test hands its own), so that one object wires
    a controller's watches to one registry.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics or METRICS
        self._lock = threading.Lock()
        self._failing: set[str] = set()
        self.reconnects = 0  # also egress_authz_watch_reconnects_total, per resource

    @property
    def reachable(self) -> bool:
        return not self._failing

    def ok(self, who: str) -> None:
        with self._lock:
            if who in self._failing:
                self._failing.discard(who)
                log.info("%s: API server reachable again", who)
            self.metrics.api_unreachable.set(0.0 if not self._failing else 1.0)

    def failed(self, who: str, error: Exception) -> None:
        with self._lock:
            self.reconnects += 1
            if who not in self._failing:
                log.warning("%s: API server unreachable, serving the last snapshot: %s",
                            who, error)
            self._failing.add(who)
            self.metrics.api_unreachable.set(1.0)


class Reflector:
    """Runs list+watch of `kind` in a daemon thread until stop()."""

    def __init__(
        self, api: KubeApi, kind: str, *,
        on_sync: Callable[[list[Obj]], None],
        on_event: Callable[[str, Obj], None],
        label_selector: str | None = None,
        field_selector: str | None = None,
        health: ApiHealth | None = None,
        watch_timeout: int = 300,
        backoff: Backoff | None = None,
        name: str | None = None,
        namespace: str | None = None,
    ) -> None:
        self.api, self.kind = api, kind
        self.namespace = namespace  # None: all namespaces
        self.name = name or kind
        self.label_selector, self.field_selector = label_selector, field_selector
        self.on_sync, self.on_event = on_sync, on_event
        self.health = health or ApiHealth()
        self.watch_timeout = watch_timeout
        self.backoff = backoff or Backoff()
        self.synced = threading.Event()  # set after the first full list was handed over
        self.lists = 0  # full lists done (1 + relists)
        self.resource_version = ""
        self._stop = threading.Event()
        self._raw: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"watch {self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        raw = self._raw
        if raw is not None:
            try:
                raw.shutdown()  # unblocks the read in the watch thread
            except Exception:  # already closed: nothing to unblock
                log.debug("shutting down the %s watch", self.name, exc_info=True)
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _opened(self, raw: Any) -> None:
        self._raw = raw
        self.health.ok(self.name)  # the server answered: this watch is connected again

    def _run(self) -> None:
        rv: str | None = None
        # The first list may come from the API server's cache ("0": no etcd read per replica
        # and worker); after 410 Gone that cache is behind what we saw, so read the latest.
        list_rv: str | None = "0"
        while not self._stop.is_set():
            try:
                if rv is None:
                    items, rv = self.api.list(self.kind, label_selector=self.label_selector,
                                              field_selector=self.field_selector,
                                              namespace=self.namespace,
                                              resource_version=list_rv)
                    self.lists += 1
                    self._handle(self.on_sync, items)
                    self.synced.set()
                    self.health.ok(self.name)
                self.resource_version = rv
                started, seen = time.monotonic(), 0
                for ev in self.api.watch(self.kind, rv, timeout_seconds=self.watch_timeout,
                                         label_selector=self.label_selector,
                                         field_selector=self.field_selector,
                                         opened=self._opened, namespace=self.namespace):
                    if self._stop.is_set():
                        return
                    seen += 1
                    if ev.resource_version:
                        rv = self.resource_version = ev.resource_version
                    if ev.type != "BOOKMARK":
                        self._handle(self.on_event, ev.type, ev.object)
                    self.backoff.reset()
                # The server ended the stream (its timeout): watch again at once, unless it
                # ends streams immediately, which would be a hot loop.
                if seen == 0 and time.monotonic() - started < 1.0:
                    self._sleep(self.backoff.next())
            except KubeGone as e:
                log.info("%s: %s; listing again", self.name, e.message)
                self.health.metrics.watch_reconnects.labels(self.kind).inc()
                rv, list_rv = None, None
                self._sleep(self.backoff.next() / 4)  # a relist is due, not an outage
            except KubeUnreachable as e:
                if self._stop.is_set():
                    return
                self.health.metrics.watch_reconnects.labels(self.kind).inc()
                self.health.failed(self.name, e)
                self._sleep(self.backoff.next())
            except KubeError as e:
                self.health.metrics.watch_reconnects.labels(self.kind).inc()
                log.warning("%s: %s", self.name, e)
                self._sleep(self.backoff.next())
            finally:
                self._raw = None

    def _handle(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a bug in one handler must not end the watch
            log.exception("%s: handler failed", self.name)

    def _sleep(self, seconds: float) -> None:
        self._stop.wait(seconds)
