"""The compiled policy in force, swapped as one reference.

Sources (a directory of YAML, a Kubernetes watch) publish whole PolicySets;
the Check path reads `store.current` once per request, so a request sees the
old snapshot or the new one, never a mix.
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .engine import Snapshot, compile_policy
from .model import PolicySet

_gc_lock = threading.Lock()
_gc_pauses = 0  # gc_paused() blocks open in any thread; the collector runs again at 0
_gc_was_enabled = True


@contextmanager
def gc_paused(pause: bool = True) -> Iterator[None]:
    """No automatic garbage collection inside the block (when `pause`).

    Building a large policy allocates millions of objects that live on, which
    sets off full collections walking the half-built heap while every Check
    thread waits for the GIL (two of 130 ms each compiling 30,000 rules). What
    is built is acyclic, so reference counting frees it without the collector.
    """
    global _gc_pauses, _gc_was_enabled
    if not pause:
        yield
        return
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


class _Reaper:
    """Lets go of replaced snapshots a piece at a time, in a background thread.

    The last reference to a snapshot and its policies frees them in one cascade
    of deallocations that holds the GIL throughout: 150 ms for 30,000 rules
    here, several times that on a busy node, every Check thread waiting. The
    reaper takes references to the pieces (policies, rules, per-namespace
    indexes), gives the source a moment to drop its own, then releases them a
    few at a time with the GIL handed over in between. Nothing is mutated: a
    Check still deciding on the old snapshot keeps it whole.
    """

    DELAY = 1.0  # seconds for the publishing source to drop its references
    BATCH = 64

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Snapshot] = queue.SimpleQueue()
        self._started = False
        self._lock = threading.Lock()
        self.released = 0  # snapshots let go of (tests)

    def put(self, snapshot: Snapshot) -> None:
        with self._lock:
            if not self._started:
                threading.Thread(target=self._run, name="snapshot reaper", daemon=True).start()
                self._started = True
        self._queue.put(snapshot)

    def _run(self) -> None:
        while True:
            snapshot = self._queue.get()
            time.sleep(self.DELAY)
            pieces: list[object] = [*snapshot.namespaces.values()]
            for policy in snapshot.policy_set.policies:
                pieces.append(policy)
                pieces.extend(policy.rules)
            del snapshot  # its own dicts only: what they hold is in `pieces`
            while pieces:
                del pieces[-self.BATCH:]
                time.sleep(0)  # a waiting Check thread takes the GIL here
            self.released += 1


_REAPER = _Reaper()


class PolicyStore:
    def __init__(self, *, trust_domain: str = "cluster.local", freeze_gc: bool = True) -> None:
        self.trust_domain = trust_domain
        self.freeze_gc = freeze_gc
        self.current: Snapshot | None = None  # None until the first policy is published
        self._lock = threading.Lock()
        self._revision = 0
        self._listeners: list[Callable[[Snapshot], None]] = []

    @property
    def loaded(self) -> bool:
        return self.current is not None

    def publish(self, policy_set: PolicySet) -> Snapshot:
        """Compile and install a PolicySet; the revision grows by one each time."""
        with self._lock, gc_paused(self.freeze_gc):
            self._revision += 1
            snapshot = compile_policy(
                PolicySet(policy_set.policies, revision=self._revision),
                trust_domain=self.trust_domain,
            )
            old, self.current = self.current, snapshot
            listeners = list(self._listeners)
            if self.freeze_gc:
                # A snapshot is long-lived and large (100,000 hosts: ~40 MiB of
                # objects); moving it out of the collector's generations keeps full
                # collections from walking it during Checks (p99 262 µs instead of
                # 4 ms in bench_engine). Old snapshots are still freed: they hold no
                # cycles, so reference counting reclaims them. No gc.collect() first:
                # a full collection of a freshly built snapshot stops every Check
                # thread (200 ms for 30,000 rules); what it would find are cycles
                # made since the last publish, which compiling does not make.
                gc.freeze()
        if old is not None and self.freeze_gc:
            _REAPER.put(old)
        for listener in listeners:
            listener(snapshot)
        return snapshot

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """Call `listener` with every snapshot published from now on."""
        with self._lock:
            self._listeners.append(listener)
