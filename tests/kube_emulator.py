"""A small, stateful Kubernetes API server for tests, served over real HTTP on loopback.

Production code talks to it with the official `kubernetes` client, unchanged: the
emulator keeps objects, a global monotonically increasing resourceVersion, a bounded
event history for watches (with 410 Gone once it is compacted), BOOKMARK events,
label/field selectors, merge/strategic/JSON patches and a simplified server-side apply
(per-manager field ownership, so an apply restores fields changed by hand).

Tests steer it directly: seed/modify/delete objects without HTTP, drop watch
connections, compact history, stop and restart on the same port, read Events and
the request log. Everything is in-process and binds only 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonpatch
import yaml
from kubernetes import client

Obj = dict[str, Any]
Path = tuple[str, ...]


@dataclass(frozen=True)
class Resource:
    group: str  # "" for core
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


DEFAULT_RESOURCES = (
    Resource("", "v1", "configmaps", "ConfigMap"),
    Resource("", "v1", "pods", "Pod"),
    Resource("", "v1", "events", "Event"),
    Resource("", "v1", "namespaces", "Namespace", namespaced=False),
    Resource("", "v1", "services", "Service"),  # the gateway's: its port map
    Resource("coordination.k8s.io", "v1", "leases", "Lease"),
    Resource("networking.istio.io", "v1", "serviceentries", "ServiceEntry"),
    Resource("networking.istio.io", "v1", "virtualservices", "VirtualService"),
    Resource("networking.istio.io", "v1", "destinationrules", "DestinationRule"),
    Resource("networking.istio.io", "v1", "gateways", "Gateway"),
    Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
)

# Metadata the server owns: never part of anyone's managed fields, never overwritten by clients.
_SERVER_META = ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return _status(self.code, self.reason, self.message)


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# --------------------------------------------------------------------------
# Selectors

_REQ = re.compile(
    r"\s*(?:(?P<not>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<skey>[\w./-]+)\s+(?P<sop>in|notin)\s+\((?P<vals>[^)]*)\)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[\w./-]*))?)\s*(?:,|$)"
)


def parse_label_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """`a=b,c!=d,e,!f,g in (x,y),h notin (z)` → predicate over a label dict."""
    if not text:
        return lambda _labels: True
    preds: list[Callable[[dict[str, str]], bool]] = []
    pos = 0
    while pos < len(text):
        m = _REQ.match(text, pos)
        if not m or m.end() == pos:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {text!r}")
        pos = m.end()
        if m["nkey"]:
            k = m["nkey"]
            preds.append(lambda lb, k=k: k not in lb)
        elif m["skey"]:
            k, vals = m["skey"], {v.strip() for v in m["vals"].split(",") if v.strip()}
            if m["sop"] == "in":
                preds.append(lambda lb, k=k, vals=vals: lb.get(k) in vals)
            else:
                preds.append(lambda lb, k=k, vals=vals: lb.get(k) not in vals)
        elif m["op"] is None:
            k = m["key"]
            preds.append(lambda lb, k=k: k in lb)
        elif m["op"] == "!=":
            k, v = m["key"], m["val"]
            preds.append(lambda lb, k=k, v=v: lb.get(k) != v)
        else:
            k, v = m["key"], m["val"]
            preds.append(lambda lb, k=k, v=v: lb.get(k) == v)
    return lambda labels: all(p(labels) for p in preds)


def parse_field_selector(text: str | None) -> Callable[[Obj], bool]:
    """`status.phase=Running,metadata.name!=x` → predicate over an object."""
    if not text:
        return lambda _obj: True
    preds: list[Callable[[Obj], bool]] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        path, op, want = m[1].split("."), m[2], m[3]

        def pred(obj: Obj, path: list[str] = path, op: str = op, want: str = want) -> bool:
            cur: Any = obj
            for p in path:
                cur = cur.get(p) if isinstance(cur, dict) else None
            got = "" if cur is None else str(cur)
            return got == want if op != "!=" else got != want

        preds.append(pred)
    return lambda obj: all(p(obj) for p in preds)


# --------------------------------------------------------------------------
# Field ownership for server-side apply (simplified: lists are atomic leaves)


def _leaves(obj: Any, prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            if not prefix and k in ("apiVersion", "kind"):
                continue
            if prefix == ("metadata",) and k in (*_SERVER_META, "name", "namespace"):
                continue
            out.update(_leaves(v, (*prefix, k)))
    elif prefix:
        out[prefix] = obj
    return out


def _get_path(obj: Any, path: Path) -> Any:
    for p in path:
        if not isinstance(obj, dict) or p not in obj:
            return _MISSING
        obj = obj[p]
    return obj


def _del_path(obj: Obj, path: Path) -> None:
    parents = []
    cur: Any = obj
    for p in path[:-1]:
        if not isinstance(cur, dict) or p not in cur:
            return
        parents.append((cur, p))
        cur = cur[p]
    if isinstance(cur, dict):
        cur.pop(path[-1], None)
    # Drop maps left empty by the removal, as the API server does for applied fields.
    for parent, key in reversed(parents):
        if parent[key] == {}:
            del parent[key]
        else:
            break


def _set_path(obj: Obj, path: Path, value: Any) -> None:
    cur = obj
    for p in path[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[path[-1]] = copy.deepcopy(value)


_MISSING = object()


def _fields_v1(paths: Iterable[Path]) -> Obj:
    root: Obj = {}
    for path in paths:
        cur = root
        for p in path:
            cur = cur.setdefault(f"f:{p}", {})
    return root


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386. Used for strategic merge patches as well (lists replaced wholesale)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = _merge_patch(result.get(k), v)
    return result


# --------------------------------------------------------------------------
# The store


@dataclass
class _Stored:
    obj: Obj
    managers: dict[str, set[Path]] = field(default_factory=dict)  # manager → owned leaf paths
    operations: dict[str, str] = field(default_factory=dict)  # manager → Apply / Update


@dataclass(frozen=True)
class _Change:
    rv: int
    resource: Resource
    type: str  # ADDED / MODIFIED / DELETED
    obj: Obj
    old: Obj | None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    content_type: str
    status: int = 0


Key = tuple[str, str, str, str]  # group, plural, namespace, name


class KubeEmulator:
    """See the module docstring. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        resources: Iterable[Resource] = DEFAULT_RESOURCES,
        *,
        bookmark_interval: float = 1.0,
        history_limit: int = 100_000,
    ) -> None:
        self.resources = list(resources)
        self.bookmark_interval = bookmark_interval
        self.history_limit = history_limit
        self.requests: list[RequestRecord] = []
        # Called with (method, path) before each request other than a watch is handled,
        # on the request's own thread: tests slow down or block one API with it.
        self.before_request: Callable[[str, str], None] | None = None
        # pods/portforward (tests/kube_portforward.py): (namespace, pod, port) -> address
        self.port_forwards: dict[tuple[str, str, int], tuple[str, int]] = {}
        self.port = 0
        self._by_path = {(r.group, r.version, r.plural): r for r in self.resources}
        self._by_kind = {(r.api_version, r.kind): r for r in self.resources}
        self._cond = threading.Condition()
        self._objects: dict[Key, _Stored] = {}
        # Real servers never answer resourceVersion "0" (it means "any" in requests).
        self._rv = 100
        self._floor = 0  # watches from a resourceVersion below this get 410 Gone
        self._history: list[_Change] = []
        self._watch_gen = 0  # bumped by drop_watches()/stop(): open watches end
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> KubeEmulator:
        """Listen on 127.0.0.1 (the same port as before after a stop())."""
        emu = self

        class Handler(_Handler):
            emulator = emu

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler, bind_and_activate=False)
        server.daemon_threads = True
        server.allow_reuse_address = True
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.server_bind()
        server.server_activate()
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Become unreachable: stop listening and cut every open connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self.drop_watches()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            _hard_close(conn)
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> KubeEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configuration(self) -> client.Configuration:
        cfg = client.Configuration()
        cfg.host = self.url
        return cfg

    def api_client(self) -> client.ApiClient:
        return client.ApiClient(self.configuration())

    # ---------------------------------------------------------------- test controls

    def drop_watches(self) -> None:
        """Close every open watch connection (abruptly, like a lost TCP connection)."""
        with self._cond:
            self._watch_gen += 1
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the history: watches from any older resourceVersion now get 410 Gone."""
        with self._cond:
            self._history.clear()
            self._floor = self._rv
            self._cond.notify_all()

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def resource(self, api_version: str, kind: str) -> Resource:
        try:
            return self._by_kind[(api_version, kind)]
        except KeyError:
            raise KeyError(f"emulator does not serve {api_version} {kind}") from None

    def seed(self, *objs: Obj, manager: str = "test") -> list[Obj]:
        """Create or replace objects directly (emits watch events); returns the stored copies."""
        out = []
        for obj in objs:
            res = self.resource(obj["apiVersion"], obj["kind"])
            meta = obj.get("metadata", {})
            ns = meta.get("namespace", "default") if res.namespaced else ""
            with self._cond:
                key = self._key(res, ns, meta["name"])
                if key in self._objects:
                    out.append(self._update(res, key, copy.deepcopy(obj), manager, check_rv=False))
                else:
                    out.append(self._create(res, ns, copy.deepcopy(obj), manager))
        return out

    def modify(
        self, api_version: str, kind: str, namespace: str, name: str,
        change: Callable[[Obj], None], *, manager: str = "kubectl-edit",
    ) -> Obj:
        """Edit an object in place by hand (`change` mutates a copy); like `kubectl edit`."""
        res = self.resource(api_version, kind)
        with self._cond:
            key = self._key(res, namespace, name)
            stored = self._objects.get(key)
            if stored is None:
                raise KeyError(f"{kind} {namespace}/{name} not found")
            obj = copy.deepcopy(stored.obj)
            change(obj)
            return self._update(res, key, obj, manager, check_rv=False)

    def remove(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        res = self.resource(api_version, kind)
        with self._cond:
            self._delete(self._key(res, namespace, name))

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        res = self.resource(api_version, kind)
        with self._cond:
            stored = self._objects.get(self._key(res, namespace, name))
            return copy.deepcopy(stored.obj) if stored else None

    def list(self, api_version: str, kind: str, namespace: str | None = None) -> list[Obj]:
        res = self.resource(api_version, kind)
        with self._cond:
            return [
                copy.deepcopy(s.obj)
                for (g, p, ns, _n), s in sorted(self._objects.items())
                if (g, p) == (res.group, res.plural) and namespace in (None, ns)
            ]

    def events(self, namespace: str | None = None, *, involved: str | None = None,
               reason: str | None = None) -> list[Obj]:
        """core/v1 Events, oldest first; `involved` filters on involvedObject.name."""
        evs = self.list("v1", "Event", namespace)
        evs = [
            e for e in evs
            if (involved is None or e.get("involvedObject", {}).get("name") == involved)
            and (reason is None or e.get("reason") == reason)
        ]
        return sorted(evs, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def changes(self, since_rv: int = 0) -> list[tuple[str, Obj]]:
        """Every write after resourceVersion `since_rv`, in order, as (ADDED / MODIFIED /
        DELETED, object): tests replay it to see each state the cluster went through."""
        with self._cond:
            return [(c.type, copy.deepcopy(c.obj)) for c in self._history if c.rv > since_rv]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0,
                 interval: float = 0.02) -> Any:
        """Poll `predicate` until truthy; returns its value or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)

    # ---------------------------------------------------------------- store internals (lock held)

    def _key(self, res: Resource, namespace: str, name: str) -> Key:
        return (res.group, res.plural, namespace if res.namespaced else "", name)

    def _bump(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _record(self, res: Resource, type_: str, obj: Obj, old: Obj | None) -> None:
        self._history.append(_Change(self._rv, res, type_, copy.deepcopy(obj), old))
        if len(self._history) > self.history_limit:
            drop = len(self._history) - self.history_limit
            self._floor = self._history[drop - 1].rv
            del self._history[:drop]
        self._cond.notify_all()

    def _render_managed(self, stored: _Stored, res: Resource) -> None:
        now = _now()
        stored.obj["metadata"]["managedFields"] = [
            {
                "manager": m,
                "operation": stored.operations.get(m, "Update"),
                "apiVersion": res.api_version,
                "time": now,
                "fieldsType": "FieldsV1",
                "fieldsV1": _fields_v1(sorted(paths)),
            }
            for m, paths in sorted(stored.managers.items())
            if paths
        ]

    def _create(self, res: Resource, namespace: str, obj: Obj, manager: str,
                operation: str = "Update") -> Obj:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name: Required value")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if res.namespaced:
            if meta.get("namespace", namespace) != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the object does not match")
            meta["namespace"] = namespace
        key = self._key(res, namespace, meta["name"])
        if key in self._objects:
            raise ApiError(409, "AlreadyExists",
                           f'{res.plural} "{meta["name"]}" already exists')
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        for k in _SERVER_META:
            meta.pop(k, None)
        stored = _Stored(obj, {manager: set(_leaves(obj))}, {manager: operation})
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._bump(),
                    generation=1)
        self._render_managed(stored, res)
        self._objects[key] = stored
        self._record(res, "ADDED", obj, None)
        return copy.deepcopy(obj)

    def _update(self, res: Resource, key: Key, obj: Obj, manager: str, *, check_rv: bool,
                applied: set[Path] | None = None) -> Obj:
        stored = self._objects[key]
        old = stored.obj
        meta = obj.setdefault("metadata", {})
        sent_rv = meta.get("resourceVersion")
        if check_rv and sent_rv not in (None, "", old["metadata"]["resourceVersion"]):
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {res.plural} "{key[3]}": the object '
                           "has been modified; please apply your changes to the latest version "
                           "and try again")
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        meta["name"], meta["namespace"] = old["metadata"]["name"], old["metadata"].get("namespace")
        if not res.namespaced:
            meta.pop("namespace", None)
        for k in _SERVER_META:
            meta[k] = old["metadata"].get(k)
        new_leaves, old_leaves = _leaves(obj), _leaves(old)
        if applied is None:
            # An Update: the manager takes every leaf it changed or added.
            changed = {p for p, v in new_leaves.items() if old_leaves.get(p, _MISSING) != v}
        else:
            changed = applied
        for m, paths in stored.managers.items():
            if m != manager:
                paths -= changed
            paths &= set(new_leaves)
        mine = stored.managers.setdefault(manager, set())
        mine |= changed
        if applied is not None:
            mine &= applied | set()
            stored.operations[manager] = "Apply"
        else:
            stored.operations.setdefault(manager, "Update")
        stored.managers = {m: p for m, p in stored.managers.items() if p}
        if obj == old:
            stored.obj = obj
            self._render_managed(stored, res)
            return copy.deepcopy(obj)  # a no-op write does not bump the resourceVersion
        if {k: v for k, v in obj.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }:
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        meta["resourceVersion"] = self._bump()
        stored.obj = obj
        self._render_managed(stored, res)
        self._record(res, "MODIFIED", obj, old)
        return copy.deepcopy(obj)

    def _apply(self, res: Resource, namespace: str, name: str, applied: Obj, manager: str,
               force: bool) -> Obj:
        """Server-side apply: own the leaves given, drop leaves this manager no longer gives."""
        if applied.get("apiVersion") != res.api_version or applied.get("kind") != res.kind:
            raise ApiError(400, "BadRequest", "apply: apiVersion/kind do not match the URL")
        meta = applied.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", "apply: the name does not match the URL")
        meta["name"] = name
        key = self._key(res, namespace, name)
        stored = self._objects.get(key)
        if stored is None:
            return self._create(res, namespace, applied, manager, operation="Apply")
        leaves = _leaves(applied)
        obj = copy.deepcopy(stored.obj)
        conflicts = []
        for p, v in leaves.items():
            cur = _get_path(obj, p)
            owners = [m for m, ps in stored.managers.items() if m != manager and p in ps]
            if owners and cur is not _MISSING and cur != v:
                conflicts.append(f'conflict with "{owners[0]}": .{".".join(p)}')
        if conflicts and not force:
            raise ApiError(409, "Conflict", f"Apply failed with {len(conflicts)} conflict(s): "
                           + "; ".join(conflicts))
        # Fields this manager applied before and no longer applies are removed, unless
        # someone else also owns them.
        others = set().union(*(ps for m, ps in stored.managers.items() if m != manager))
        for p in stored.managers.get(manager, set()) - set(leaves) - others:
            _del_path(obj, p)
        for p, v in leaves.items():
            _set_path(obj, p, v)
        return self._update(res, key, obj, manager, check_rv=False, applied=set(leaves))

    def _delete(self, key: Key) -> Obj:
        stored = self._objects.pop(key, None)
        res = self._by_path_plural(key[0], key[1])
        if stored is None:
            raise ApiError(404, "NotFound", f'{key[1]} "{key[3]}" not found')
        obj = copy.deepcopy(stored.obj)
        obj["metadata"]["resourceVersion"] = self._bump()
        self._record(res, "DELETED", obj, stored.obj)
        return obj

    def _by_path_plural(self, group: str, plural: str) -> Resource:
        return next(r for r in self.resources if (r.group, r.plural) == (group, plural))

    def _select(self, res: Resource, namespace: str | None, labels: Callable[..., bool],
                fields: Callable[[Obj], bool]) -> Callable[[Obj | None], bool]:
        def match(obj: Obj | None) -> bool:
            if obj is None:
                return False
            meta = obj["metadata"]
            return ((namespace is None or meta.get("namespace") == namespace)
                    and labels(meta.get("labels") or {}) and fields(obj))
        return match

    def _list(self, res: Resource, match: Callable[[Obj | None], bool]) -> list[Obj]:
        return [
            copy.deepcopy(s.obj)
            for (g, p, _ns, _n), s in sorted(self._objects.items())
            if (g, p) == (res.group, res.plural) and match(s.obj)
        ]

    def _page(self, items: list[Obj], q: dict[str, str]) -> tuple[list[Obj], Obj]:
        """One page of a list (`limit`/`continue`); the token holds the list's resourceVersion
        and the last key served. Unlike etcd, later pages see the current objects."""
        rv, after = str(self._rv), ("", "")
        if q.get("continue"):
            if q.get("resourceVersion"):
                raise ApiError(400, "BadRequest",
                               "specifying resource version is not allowed when using continue")
            try:
                rv, ns, name = json.loads(base64.urlsafe_b64decode(q["continue"]))
            except (ValueError, TypeError) as e:
                raise ApiError(400, "BadRequest", f"invalid continue token: {e}") from e
            if int(rv) < self._floor:
                raise ApiError(410, "Expired", "the provided continue parameter is too old")
            after = (ns, name)
        rest = [o for o in items
                if (o["metadata"].get("namespace") or "", o["metadata"]["name"]) > after]
        page = rest[: int(q["limit"])]
        meta: Obj = {"resourceVersion": rv}
        if len(rest) > len(page):
            last = page[-1]["metadata"]
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                [rv, last.get("namespace") or "", last["name"]]).encode()).decode()
        return page, meta

    # ---------------------------------------------------------------- watch

    def _watch(self, res: Resource, match: Callable[[Obj | None], bool], rv: str | None,
               timeout: float | None, bookmarks: bool, send: Callable[[Obj], None]) -> bool:
        """Stream events until timeout (True) or a drop (False)."""
        deadline = time.monotonic() + timeout if timeout else None
        with self._cond:
            gen = self._watch_gen
            if rv in (None, "", "0"):
                last = self._rv
                initial = [{"type": "ADDED", "object": o} for o in self._list(res, match)]
            else:
                last = int(rv)
                initial = []
                if last < self._floor:
                    initial = [self._gone(last)]
        for ev in initial:
            send(ev)
        if initial and initial[0]["type"] == "ERROR":
            return True
        next_bookmark = time.monotonic() + self.bookmark_interval
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._watch_gen != gen:
                        return False
                    if deadline is not None and now >= deadline:
                        return True
                    if last < self._floor:
                        pending: list[Obj] = [self._gone(last)]
                        break
                    if self._history and self._history[-1].rv > last:
                        pending = self._events_after(res, match, last)
                        last = self._history[-1].rv
                        if pending:
                            break
                        continue
                    if bookmarks and now >= next_bookmark:
                        pending = [{"type": "BOOKMARK", "object": {
                            "kind": res.kind, "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(max(last, self._rv))}}}]
                        last = max(last, self._rv)
                        next_bookmark = now + self.bookmark_interval
                        break
                    waits = [next_bookmark - now if bookmarks else 1.0]
                    if deadline is not None:
                        waits.append(deadline - now)
                    self._cond.wait(max(0.001, min(waits)))
            for ev in pending:
                send(ev)
            if pending[0]["type"] == "ERROR":
                return True

    def _events_after(self, res: Resource, match: Callable[[Obj | None], bool],
                      last: int) -> list[Obj]:
        lo, hi = 0, len(self._history)
        while lo < hi:  # bisect on rv: history is in rv order
            mid = (lo + hi) // 2
            if self._history[mid].rv <= last:
                lo = mid + 1
            else:
                hi = mid
        out = []
        for ch in self._history[lo:]:
            if ch.resource != res:
                continue
            now_in, was_in = match(ch.obj), match(ch.old)
            # A selector sees an object enter or leave it as ADDED / DELETED, as the API does.
            if ch.type == "MODIFIED" and now_in != was_in:
                type_ = "ADDED" if now_in else "DELETED"
            elif ch.type == "DELETED":
                type_ = "DELETED" if was_in else ""
            else:
                type_ = ch.type if now_in else ""
            if type_:
                out.append({"type": type_, "object": copy.deepcopy(ch.obj)})
        return out

    def _gone(self, rv: int) -> Obj:
        return {"type": "ERROR", "object": _status(
            410, "Expired", f"too old resource version: {rv} ({self._floor})")}

    # ---------------------------------------------------------------- HTTP dispatch

    def _route(self, path: str) -> tuple[Resource, str | None, str | None]:
        """URL path → (resource, namespace or None for all, name or None)."""
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(404, "NotFound", f"the server could not find {path}")
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        res = self._by_path.get((group, version, rest[0])) if rest else None
        if res is None or len(rest) > 2 or (namespace is not None and not res.namespaced):
            raise ApiError(404, "NotFound", f"the server could not find the resource {path}")
        return res, namespace, rest[1] if len(rest) == 2 else None

    def handle(self, method: str, path: str, q: dict[str, str], ctype: str, body: bytes,
               send_event: Callable[[Obj], None] | None) -> tuple[int, Obj] | bool:
        """One API call: (status, body), or for a watch whether it ended cleanly."""
        res, namespace, name = self._route(path)
        ns = namespace or ""
        manager = q.get("fieldManager") or "unknown"
        if method == "GET" and name is None:
            match = self._select(res, namespace, parse_label_selector(q.get("labelSelector")),
                                 parse_field_selector(q.get("fieldSelector")))
            if q.get("watch") in ("true", "1") and send_event is not None:
                timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
                return self._watch(res, match, q.get("resourceVersion"), timeout,
                                   q.get("allowWatchBookmarks") in ("true", "1"), send_event)
            with self._cond:
                items = self._list(res, match)
                meta = {"resourceVersion": str(self._rv)}
                if int(q.get("limit") or 0) > 0 and q.get("resourceVersion") != "0":  # "0": the watch
                    items, meta = self._page(items, q)  # cache, which ignores limit
                return 200, {"kind": f"{res.kind}List", "apiVersion": res.api_version,
                             "metadata": meta, "items": items}
        payload: Any = None
        if body:
            try:
                payload = (yaml.safe_load(body) if "yaml" in ctype else json.loads(body))
            except (ValueError, yaml.YAMLError) as e:
                raise ApiError(400, "BadRequest", f"cannot decode body: {e}") from e
        with self._cond:
            if method == "GET":
                stored = self._objects.get(self._key(res, ns, name or ""))
                if stored is None:
                    raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
                return 200, copy.deepcopy(stored.obj)
            if method == "POST" and name is None:
                if not isinstance(payload, dict):
                    raise ApiError(400, "BadRequest", "body must be an object")
                return 201, self._create(res, ns, payload, manager)
            if name is None:
                raise ApiError(405, "MethodNotAllowed", f"{method} on a collection")
            key = self._key(res, ns, name)
            if method == "DELETE":
                obj = self._delete(key)
                return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                             "status": "Success",
                             "details": {"name": name, "kind": res.plural,
                                         "uid": obj["metadata"]["uid"]}}
            if method == "PATCH" and ctype.startswith("application/apply-patch"):
                if not isinstance(payload, dict) or not q.get("fieldManager"):
                    raise ApiError(400, "BadRequest", "apply needs an object and a fieldManager")
                return 200, self._apply(res, ns, name, payload, q["fieldManager"],
                                        q.get("force") in ("true", "1"))
            stored = self._objects.get(key)
            if stored is None:
                raise ApiError(404, "NotFound", f'{res.plural} "{name}" not found')
            if method == "PUT":
                if not isinstance(payload, dict):
                    raise ApiError(400, "BadRequest", "body must be an object")
                return 200, self._update(res, key, payload, manager, check_rv=True)
            if method == "PATCH":
                current = copy.deepcopy(stored.obj)
                if ctype.startswith("application/json-patch"):
                    try:
                        new = jsonpatch.apply_patch(current, payload)
                    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                        raise ApiError(422, "Invalid", str(e)) from e
                elif ctype.startswith(("application/merge-patch", "application/strategic-merge")):
                    new = _merge_patch(current, payload)
                else:
                    raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
                return 200, self._update(res, key, new, manager, check_rv=True)
        raise ApiError(405, "MethodNotAllowed", f"{method} not supported")

    def _log(self, rec: RequestRecord) -> None:
        with self._conns_lock:
            self.requests.append(rec)

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hard_close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    emulator: KubeEmulator
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.emulator._track(self.connection, True)

    def finish(self) -> None:
        self.emulator._track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: tests read emulator.requests instead

    def _serve(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        watch = self.command == "GET" and q.get("watch") in ("true", "1")
        forward = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/portforward", url.path)
        if forward and (self.headers.get("Upgrade") or "").lower() == "websocket":
            from tests.kube_portforward import serve as serve_portforward

            status = serve_portforward(self, forward[1], forward[2], q)
            self.emulator._log(RequestRecord(self.command, url.path, q, ctype, status))
            self.close_connection = True
            return

        def send_event(ev: Obj) -> None:
            data = json.dumps(ev).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        status = 0
        result: tuple[int, Obj] | bool
        try:
            if watch:
                # Route errors are plain HTTP errors; after that the stream starts at once,
                # so the client's watch call returns before any event happens.
                self.emulator._route(url.path)
                parse_label_selector(q.get("labelSelector"))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.flush()
                status = 200
                # Logged when it starts: a watch may stay open for the whole test.
                self.emulator._log(RequestRecord(self.command, url.path, q, ctype, status))
            hook = self.emulator.before_request
            if hook is not None and not watch:
                hook(self.command, url.path)
            result = self.emulator.handle(self.command, url.path, q, ctype, body,
                                          send_event if watch else None)
            if not isinstance(result, bool):
                status = result[0]
        except ApiError as e:
            status, result = e.code, (e.code, e.status())
        except OSError:  # the client went away, or stop() cut the connection
            self.close_connection = True
            return
        finally:
            if not watch or status != 200:
                self.emulator._log(RequestRecord(self.command, url.path, q, ctype, status))
        if isinstance(result, bool):
            self.close_connection = True
            if result and self.emulator._server is not None:
                try:  # timeoutSeconds reached: end the chunked stream properly
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    pass
            else:  # dropped: cut the TCP connection mid-stream, as a lost connection would
                _hard_close(self.connection)
            return
        code, obj = result
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

