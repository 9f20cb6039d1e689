"""The compiled policy in force, swapped as one reference.

Sources (a directory of YAML, a Kubernetes watch) publish whole PolicySets;
the Check path reads `store.current` once per request, so a request sees the
old snapshot or the new one, never a mix.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

from .engine import Snapshot, compile_policy
from .model import PolicySet


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
        with self._lock:
            self._revision += 1
            snapshot = compile_policy(
                PolicySet(policy_set.policies, revision=self._revision),
                trust_domain=self.trust_domain,
            )
            self.current = snapshot
            listeners = list(self._listeners)
        if self.freeze_gc:
            # A snapshot is long-lived and large (100,000 hosts: ~40 MiB of
            # objects); moving it out of the collector's generations keeps full
            # collections from walking it during Checks (p99 262 µs instead of
            # 4 ms in bench_engine). Old snapshots are still freed: they hold no
            # cycles, so reference counting reclaims them.
            gc.collect()
            gc.freeze()
        for listener in listeners:
            listener(snapshot)
        return snapshot

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """Call `listener` with every snapshot published from now on."""
        with self._lock:
            self._listeners.append(listener)
