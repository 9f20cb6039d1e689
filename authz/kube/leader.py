"""Leader election on a coordination.k8s.io/v1 Lease: only the holder writes Istio objects.

Every replica serves Check; this only decides who writes. Expiry is judged the way
client-go does it, by how long *we* have seen the same renewTime, so clock skew between
replicas does not matter. A holder that cannot renew for a whole lease duration stops
considering itself leader before anyone else may take over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from .client import KubeApi, KubeConflict, KubeError, KubeNotFound, Obj

log = logging.getLogger(__name__)


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, api: KubeApi, identity: str, *, name: str = "egress-authz",
                 lease_duration: float = 15.0, renew_interval: float | None = None,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self.api, self.identity, self.name = api, identity, name
        self.namespace = api.service_ns
        self.lease_duration = lease_duration
        self.renew_interval = renew_interval or lease_duration / 3
        self.on_change = on_change
        self.transitions = 0  # times this replica became leader
        self._leader = False
        self._last_renew = 0.0  # monotonic time of our last successful renew
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        # Without a recent renew we may already have been replaced: stop writing first.
        if self._leader and time.monotonic() - self._last_renew > self.lease_duration:
            self._set(False)
        return self._leader

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="leader election", daemon=True)
        self._thread.start()

    def stop(self, *, release: bool = True) -> None:
        """Stop campaigning; `release` hands the Lease over at once (a clean shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if release and self._leader:
            try:
                lease = self.api.get("Lease", self.namespace, self.name)
                if lease.get("spec", {}).get("holderIdentity") == self.identity:
                    lease["spec"]["holderIdentity"] = None
                    self.api.replace("Lease", self.namespace, self.name, lease)
            except KubeError as e:
                log.info("could not release the Lease: %s", e)
        self._set(False)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except KubeError as e:
                log.warning("leader election: %s", e)
            self.is_leader  # noqa: B018 - drops leadership once renewals have failed too long
            self._stop.wait(self.renew_interval)

    def try_acquire_or_renew(self) -> bool:
        now = _micro_now()
        try:
            lease = self.api.get("Lease", self.namespace, self.name)
        except KubeNotFound:
            try:
                self.api.create("Lease", self.namespace, {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(now, acquire=now, transitions=0)})
            except KubeConflict:
                return False  # another replica created it first
            return self._won()
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        observed = (holder, str(spec.get("renewTime")))
        if observed != self._observed:
            self._observed, self._observed_at = observed, time.monotonic()
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        expired = time.monotonic() - self._observed_at > duration
        if holder and holder != self.identity and not expired:
            self._set(False)
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            lease["spec"] = self._spec(now, acquire=spec.get("acquireTime") or now,
                                       transitions=transitions)
        else:
            lease["spec"] = self._spec(now, acquire=now, transitions=transitions + 1)
        try:
            self.api.replace("Lease", self.namespace, self.name, lease)
        except KubeConflict:  # someone else wrote it between our read and write
            self._set(False)
            return False
        return self._won()

    def _spec(self, now: str, *, acquire: str, transitions: int) -> Obj:
        return {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.lease_duration)
                or 1, "acquireTime": acquire, "renewTime": now, "leaseTransitions": transitions}

    def _won(self) -> bool:
        self._last_renew = time.monotonic()
        self._set(True)
        return True

    def _set(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            self.transitions += 1
        log.info("%s %s the leader (Lease %s/%s)", self.identity,
                 "is now" if leader else "is no longer", self.namespace, self.name)
        if self.on_change is not None:
            try:
                self.on_change(leader)
            except Exception:
                log.exception("leader change handler failed")
