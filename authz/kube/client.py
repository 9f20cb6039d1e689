"""The one door to the Kubernetes API: official client, raw dicts, our own errors.

Every request goes through `KubeApi._call`, which checks it against the permissions
table, so the table is exactly what the code uses. Payloads stay plain dicts here and
are turned into model values by the callers at the edge (policy parser, workload index).
Library exceptions never leave this module: callers see the KubeError tree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s

from .permissions import Permission, Scope, require, verb_of

Obj = dict[str, Any]

SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
REQUEST_TIMEOUT = (3.0, 10.0)  # connect, read: a hung API server must not hang a loop
LIST_PAGE_SIZE = 500  # client-go's reflector pages lists by 500 too


class KubeError(Exception):
    """Anything that went wrong talking to the API server."""


class KubeUnreachable(KubeError):
    """No answer: connection refused, reset, timed out."""


class KubeStatusError(KubeError):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code, self.reason, self.message = code, reason, message


class KubeNotFound(KubeStatusError):
    pass


class KubeConflict(KubeStatusError):
    pass


class KubeGone(KubeStatusError):
    """410: the resourceVersion is too old; list again."""


def _status_error(code: int, body: Any) -> KubeStatusError:
    status = body if isinstance(body, dict) else {}
    reason, message = str(status.get("reason", "")), str(status.get("message", body))
    cls = {404: KubeNotFound, 409: KubeConflict, 410: KubeGone}.get(code, KubeStatusError)
    return cls(code, reason, message)


def service_namespace(default: str = "egress-authz") -> str:
    """The namespace the service runs in (its service account's), or `default`."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def configuration(*, kubeconfig: str | None = None, host: str | None = None
                  ) -> k8s.Configuration:
    """In-cluster config, a kubeconfig file, or a bare URL (tests, `kubectl proxy`)."""
    from kubernetes import config as k8s_config

    cfg = k8s.Configuration()
    if host:
        cfg.host = host
    elif kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=cfg)
    else:
        k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=cfg)
    cfg.retries = 1  # our loops retry with backoff; urllib3's own retries only add delay
    return cfg


def _check_scope(perm: Permission, namespace: str | None) -> None:
    # A Role grants one namespace: a call across all namespaces would be refused.
    if perm.scope is Scope.GATEWAY_NAMESPACE and not namespace:
        raise KubeError(f"{perm.kind} calls need the gateway namespace")


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    object: Obj

    @property
    def resource_version(self) -> str:
        return str(self.object.get("metadata", {}).get("resourceVersion", ""))


class KubeApi:
    """Thin typed calls over `ApiClient`; paths come from the permissions table."""

    def __init__(self, api_client: k8s.ApiClient, *, service_ns: str) -> None:
        self.api_client = api_client
        self.service_ns = service_ns

    # -------------------------------------------------------------- the calls we make

    def list(self, kind: str, *, label_selector: str | None = None,
             field_selector: str | None = None, namespace: str | None = None,
             resource_version: str | None = None,
             page_size: int = LIST_PAGE_SIZE) -> tuple[list[Obj], str]:
        """All objects of `kind` (all namespaces, or `namespace`) and the list's
        resourceVersion.

        Read in pages of `page_size` (`limit`/`continue`), so that a large cluster's
        Pods are never one unbounded read. resource_version "0": whatever the API
        server has cached will do (served from its watch cache, no etcd read; the
        server may then ignore the limit, as client-go's reflector relies on);
        None: the latest state, a consistent read from etcd, page by page."""
        items: list[Obj] = []
        token: str | None = None
        restarted = False
        while True:
            query = {"labelSelector": label_selector, "fieldSelector": field_selector,
                     "limit": str(page_size)}
            if token:
                query["continue"] = token  # it carries the snapshot: no resourceVersion
            elif resource_version is not None:
                query["resourceVersion"] = resource_version
            try:
                body = self._call(kind, "GET", namespace=namespace, collection=True,
                                  query=query)
            except KubeGone:
                if token is None or restarted:
                    raise
                # The snapshot behind the token was compacted mid-list: start over, once.
                items, token, restarted = [], None, True
                continue
            items.extend(body.get("items") or [])
            meta = body.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                return items, str(meta["resourceVersion"])

    def watch(self, kind: str, resource_version: str, *, timeout_seconds: int,
              label_selector: str | None = None, field_selector: str | None = None,
              opened: Callable[[urllib3.HTTPResponse], None] | None = None,
              namespace: str | None = None) -> Iterator[WatchEvent]:
        """Events after `resource_version`; ends when the server ends the stream.

        Raises KubeGone when the server answers 410 (in the stream or as a status).
        `opened` receives the live response, so another thread can shut it down."""
        perm = require(kind, "watch")
        _check_scope(perm, namespace)
        resp = self._request(perm, "GET", namespace, None, query={
            "watch": "true", "resourceVersion": resource_version,
            "allowWatchBookmarks": "true", "timeoutSeconds": str(timeout_seconds),
            "labelSelector": label_selector, "fieldSelector": field_selector,
        }, timeout=(REQUEST_TIMEOUT[0], timeout_seconds + 10.0), stream=True)
        raw: urllib3.HTTPResponse = resp.response
        if opened is not None:
            opened(raw)
        try:
            buf = b""
            for chunk in raw.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield self._event(line)
            if buf.strip():
                yield self._event(buf)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeUnreachable(f"watch {kind}: {e}") from e
        finally:
            raw.release_conn()

    def get(self, kind: str, namespace: str, name: str) -> Obj:
        return self._call(kind, "GET", namespace=namespace, name=name)

    def create(self, kind: str, namespace: str, body: Obj) -> Obj:
        return self._call(kind, "POST", namespace=namespace, body=body, collection=True)

    def replace(self, kind: str, namespace: str, name: str, body: Obj) -> Obj:
        return self._call(kind, "PUT", namespace=namespace, name=name, body=body)

    def apply(self, obj: Obj, *, field_manager: str, force: bool = True) -> Obj:
        meta = obj["metadata"]
        return self._call(obj["kind"], "PATCH", namespace=meta.get("namespace"),
                          name=meta["name"], body=obj,
                          content_type="application/apply-patch+yaml",
                          query={"fieldManager": field_manager,
                                 "force": "true" if force else None})

    def patch(self, kind: str, namespace: str, name: str, body: Obj) -> Obj:
        """A JSON merge patch (RFC 7386): the fields in `body` replace the stored ones."""
        return self._call(kind, "PATCH", namespace=namespace, name=name, body=body,
                          content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self._call(kind, "DELETE", namespace=namespace, name=name)

    # -------------------------------------------------------------- plumbing

    def _call(self, kind: str, method: str, *, namespace: str | None = None,
              name: str | None = None, body: Obj | None = None, collection: bool = False,
              content_type: str = "application/json",
              query: Mapping[str, str | None] | None = None) -> Obj:
        perm = require(kind, verb_of(method, collection=collection and method == "GET"), name)
        if perm.scope is Scope.SERVICE_NAMESPACE and namespace != self.service_ns:
            raise KubeError(f"{kind} calls are limited to namespace {self.service_ns}")
        _check_scope(perm, namespace)
        resp = self._request(perm, method, namespace, name, query=query or {}, body=body,
                             content_type=content_type, timeout=REQUEST_TIMEOUT)
        try:
            data = resp.read()
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise KubeUnreachable(f"{method} {kind}: {e}") from e
        parsed: Obj = json.loads(data) if data else {}
        return parsed

    def _request(self, perm: Permission, method: str, namespace: str | None, name: str | None,
                 *, query: Mapping[str, str | None], timeout: tuple[float, float],
                 body: Obj | None = None, content_type: str = "application/json",
                 stream: bool = False) -> Any:
        base = f"/apis/{perm.group}/{perm.version}" if perm.group else f"/api/{perm.version}"
        path = f"{base}/namespaces/{namespace}/{perm.resource}" if namespace else (
            f"{base}/{perm.resource}")
        if name:
            path += f"/{name}"
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        params = [(k, v) for k, v in query.items() if v is not None]
        serialized = self.api_client.param_serialize(
            method=method, resource_path=path, query_params=params, header_params=headers,
            body=body, auth_settings=["BearerToken"])
        try:
            resp = self.api_client.call_api(*serialized, _request_timeout=timeout)
        except (urllib3.exceptions.HTTPError, OSError, k8s.ApiException) as e:
            raise KubeUnreachable(f"{method} {path}: {e}") from e
        if not 200 <= resp.status < 300:
            try:
                data = resp.read()  # type: ignore[no-untyped-call]
                status = json.loads(data) if data else {}
            except (ValueError, urllib3.exceptions.HTTPError, OSError):
                status = {}
            raise _status_error(resp.status, status)
        return resp

    @staticmethod
    def _event(line: bytes) -> WatchEvent:
        ev = json.loads(line)
        obj = ev.get("object") or {}
        if ev.get("type") == "ERROR":
            raise _status_error(int(obj.get("code") or 500), obj)
        return WatchEvent(str(ev.get("type")), obj)
