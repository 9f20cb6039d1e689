"""The compiled policy in force, swapped as one reference.

Sources (a directory of YAML, a Kubernetes watch) publish whole PolicySets;
the Check path reads `store.current` once per request, so a request sees the
old snapshot or the new one, never a mix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .engine import Snapshot, compile_policy
from .model import PolicySet


class PolicyStore:
    def __init__(self, *, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
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
        for listener in listeners:
            listener(snapshot)
        return snapshot

    def subscribe(self, listener: Callable[[Snapshot], None]) -> None:
        """Call `listener` with every snapshot published from now on."""
        with self._lock:
            self._listeners.append(listener)
