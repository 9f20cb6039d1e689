"""Keeps the Istio objects in the cluster equal to what the policies call for.

On every published snapshot, on every change to an object we manage (someone edited or
deleted it) and on a periodic resync, the leader renders the wanted objects, applies
with server-side apply (field manager egress-authz, force: we own these fields) those
whose spec, labels or owners differ, and deletes managed objects no longer wanted
(found by the managed-by label). Followers watch but never write.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from ..engine import Snapshot
from ..model import MANAGED_BY_LABEL, MANAGED_BY_VALUE
from ..render import RenderOptions, object_key, render
from ..store import PolicyStore
from .client import KubeApi, KubeError, KubeNotFound, Obj
from .permissions import ISTIO_KINDS
from .watch import ApiHealth, Backoff, Reflector

log = logging.getLogger(__name__)

FIELD_MANAGER = "egress-authz"
Key = tuple[str, str, str, str]


def _differs(want: Obj, have: Obj) -> bool:
    if want.get("spec") != have.get("spec"):
        return True
    wm, hm = want["metadata"], have.get("metadata", {})
    labels = hm.get("labels") or {}
    if any(labels.get(k) != v for k, v in (wm.get("labels") or {}).items()):
        return True
    annotations = hm.get("annotations") or {}
    if any(annotations.get(k) != v for k, v in (wm.get("annotations") or {}).items()):
        return True
    return bool(wm.get("ownerReferences")) and wm.get("ownerReferences") != [
        {k: r.get(k) for k in ("apiVersion", "kind", "name", "uid")}
        for r in hm.get("ownerReferences") or []]


class RegistryWriter:
    def __init__(self, api: KubeApi, store: PolicyStore, *, options: RenderOptions,
                 is_leader: Callable[[], bool], resync_interval: float = 60.0,
                 health: ApiHealth | None = None, backoff_cap: float = 10.0,
                 watch_timeout: int = 300) -> None:
        self.api, self.store, self.options = api, store, options
        self.is_leader = is_leader
        self.resync_interval = resync_interval
        self.applied = 0  # objects applied (created, changed or restored)
        self.deleted = 0
        self.reconciles = 0
        self._lock = threading.Lock()
        self._current: dict[Key, Obj] = {}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reflectors = [
            Reflector(api, kind, on_sync=self._synced(kind), on_event=self._event,
                      label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}",
                      health=health, backoff=Backoff(cap=backoff_cap),
                      watch_timeout=watch_timeout, name=f"managed {kind}")
            for kind in ISTIO_KINDS
        ]

    def start(self) -> None:
        self.store.subscribe(self._on_snapshot)
        for r in self.reflectors:
            r.start()
        self._thread = threading.Thread(target=self._run, name="registry writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        for r in self.reflectors:
            r.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def poke(self) -> None:
        """Reconcile soon (e.g. on becoming leader)."""
        self._dirty.set()

    def _on_snapshot(self, _snapshot: Snapshot) -> None:
        self._dirty.set()

    def _synced(self, kind: str) -> Callable[[list[Obj]], None]:
        def synced(items: list[Obj]) -> None:
            with self._lock:
                for key in [k for k in self._current if k[1] == kind]:
                    del self._current[key]
                for obj in items:
                    self._current[object_key(obj)] = obj
            self._dirty.set()
        return synced

    def _event(self, type_: str, obj: Obj) -> None:
        with self._lock:
            if type_ == "DELETED":
                self._current.pop(object_key(obj), None)
            else:
                self._current[object_key(obj)] = obj
        self._dirty.set()  # a hand edit or deletion of ours: put it back

    def _run(self) -> None:
        while not self._stop.is_set():
            self._dirty.wait(self.resync_interval)
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                if not self.reconcile():
                    self._stop.wait(1.0)  # failed writes: retry, but not in a hot loop
                    self._dirty.set()
            except Exception:
                log.exception("reconciling the mesh registry failed")

    def reconcile(self) -> bool:
        """One pass; True when nothing failed (or there was nothing to do)."""
        snapshot = self.store.current
        if (snapshot is None or not self.is_leader()
                or not all(r.synced.is_set() for r in self.reflectors)):
            return True  # no policy yet (never prune on nothing), or not ours to write
        self.reconciles += 1
        wanted = {object_key(o): o for o in render(snapshot.policy_set, self.options)}
        with self._lock:
            current = dict(self._current)
        ok = True
        for key, obj in wanted.items():
            have = current.get(key)
            if have is not None and not _differs(obj, have):
                continue
            ok &= self._write(partial(self.api.apply, obj, field_manager=FIELD_MANAGER,
                                      force=True), "apply", key)
            self.applied += 1
        for key in current.keys() - wanted.keys():
            _, kind, ns, name = key
            ok &= self._write(partial(self.api.delete, kind, ns, name), "delete", key)
            self.deleted += 1
        return ok

    def _write(self, call: Callable[[], Any], what: str, key: Key) -> bool:
        try:
            call()
            return True
        except KubeNotFound:
            return what == "delete"  # already gone is what we wanted
        except KubeError as e:
            log.warning("%s %s %s/%s: %s", what, key[1], key[2], key[3], e)
            return False
