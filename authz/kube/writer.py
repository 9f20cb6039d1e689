"""Keeps the Istio objects in the cluster equal to what the policies call for.

On every published snapshot, on every change to an object we manage (someone edited or
deleted it) and on a periodic resync, the leader renders the wanted objects, applies
with server-side apply (field manager egress-authz, force: we own these fields) those
whose spec, labels or owners differ, and deletes managed objects no longer wanted
(found by the managed-by label). Followers watch but never write.

Order matters (issue 11): a ServiceEntry makes a host dialable, and a host dialable
without its VirtualService is dialled directly, around the gateway. So hosts leave the
registry before their routes and enter it after them (`RegistryWriter.reconcile`). A host
that moves between ServiceEntries (its port set changed) is briefly absent: a failed
connection for a moment, never a bypass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from ..engine import Snapshot
from ..fence import FENCE_NAME, FenceOptions, fence_policy
from ..model import MANAGED_BY_LABEL, MANAGED_BY_VALUE
from ..observe.metrics import Metrics
from ..render import APPLY_ORDER, RenderOptions, gateway_entry_last, object_key, render
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


def _order(key: Key) -> int:
    return APPLY_ORDER.index(key[1]) if key[1] in APPLY_ORDER else -1  # NetworkPolicy first


def _narrowed(want: Obj, have: Obj) -> Obj | None:
    """`have` cut down to the hosts `want` keeps, when `want` drops any (else `want`
    itself, or None when nothing is kept). A ServiceEntry's name fixes its ports, so
    hosts are what changes."""
    keep = set(want["spec"].get("hosts", []))
    had = have.get("spec", {}).get("hosts", [])
    if have.get("spec", {}).get("ports") != want["spec"].get("ports"):
        return None  # not the same port set (edited by hand?): remove it, then recreate
    if all(h in keep for h in had):
        return want
    kept = [h for h in had if h in keep]
    return {**want, "spec": {**want["spec"], "hosts": kept}} if kept else None


class RegistryWriter:
    def __init__(self, api: KubeApi, store: PolicyStore, *, options: RenderOptions,
                 is_leader: Callable[[], bool], resync_interval: float = 60.0,
                 health: ApiHealth | None = None, backoff_cap: float = 10.0,
                 watch_timeout: int = 300,
                 fences: Callable[[], set[str] | None] | None = None,
                 fence_options: FenceOptions | None = None,
                 metrics: Metrics | None = None) -> None:
        self.api, self.store, self.options = api, store, options
        # The metrics go with the health its reflectors share (as in KubePolicySource).
        health = health or ApiHealth(metrics)
        self.metrics = metrics or health.metrics
        # Layer 3: namespaces that opted in to the fence NetworkPolicy (None until known);
        # without `fences`, NetworkPolicies are neither written nor pruned.
        self.fences = fences
        self.fence_options = fence_options or FenceOptions(
            gateway_namespace=options.gateway_namespace,
            gateway_selector=dict(options.gateway_selector))
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
            for kind in (*ISTIO_KINDS, *(("NetworkPolicy",) if fences is not None else ()))
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
            # Ours are the Istio kinds with our label, and of NetworkPolicies only the fence:
            # one copied from it under another name (our label kept) is the user's.
            current = {k: o for k, o in self._current.items()
                       if k[1] != "NetworkPolicy" or k[3] == FENCE_NAME}
        fenced = self.fences() if self.fences is not None else None
        if fenced is None:  # not known yet (or not ours): leave NetworkPolicies as they are
            current = {k: o for k, o in current.items() if k[1] != "NetworkPolicy"}
        else:  # fences first: applied before anything else, deleted after everything else
            wanted = {**{object_key(o): o for o in
                         (fence_policy(ns, self.fence_options) for ns in sorted(fenced))},
                      **wanted}
        ok = True
        changed = {k: o for k, o in wanted.items()
                   if k not in current or _differs(o, current[k])}
        gone = [k for k in current if k not in wanted]
        # A host must never be dialable without its route to the gateway, not even between
        # two writes (a ServiceEntry without its VirtualService is dialled directly):
        # 1. ServiceEntries lose hosts first: unwanted ones are deleted, changed ones that
        #    drop hosts are narrowed to the hosts they keep;
        # 2. routes: DestinationRules, Gateway, VirtualServices (render's order);
        # 3. ServiceEntries gain hosts last;
        # 4. routes no longer wanted go (their hosts left the registry in step 1).
        # (The gateway's own entries go last here and first in step 3: the gateway can
        # forward a host whenever a sidecar can dial it.)
        for key in sorted((k for k in gone if k[1] == "ServiceEntry"), key=gateway_entry_last):
            ok &= self._delete(key)
        for key, obj in sorted(changed.items(), key=lambda ko: gateway_entry_last(ko[0])):
            have = current.get(key)
            if obj["kind"] == "ServiceEntry" and have is not None:
                kept = _narrowed(obj, have)
                if kept is None:
                    ok &= self._delete(key)  # it keeps none of its hosts: recreated in step 3
                elif kept is not obj:
                    ok &= self._apply(key, kept)
        if not ok:
            return False  # never add routes or hosts on top of a registry we failed to narrow
        for key, obj in changed.items():
            if obj["kind"] != "ServiceEntry":
                ok &= self._apply(key, obj)
        if not ok:
            return False  # a host is admitted only once every route for it was written
        for key, obj in changed.items():
            if obj["kind"] == "ServiceEntry":
                ok &= self._apply(key, obj)
        for key in sorted((k for k in gone if k[1] != "ServiceEntry"), key=_order, reverse=True):
            ok &= self._delete(key)
        return ok

    def _apply(self, key: Key, obj: Obj) -> bool:
        self.applied += 1
        return self._write(partial(self.api.apply, obj, field_manager=FIELD_MANAGER, force=True),
                           "apply", key)

    def _delete(self, key: Key) -> bool:
        _, kind, ns, name = key
        self.deleted += 1
        return self._write(partial(self.api.delete, kind, ns, name), "delete", key)

    def _write(self, call: Callable[[], Any], what: str, key: Key) -> bool:
        try:
            call()
            return True
        except KubeNotFound:
            return what == "delete"  # already gone is what we wanted
        except KubeError as e:
            self.metrics.registry_write_errors.inc()
            log.warning("%s %s %s/%s: %s", what, key[1], key[2], key[3], e)
            return False
