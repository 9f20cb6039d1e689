"""The CLI's side of the admin endpoint: `traces`, `explain` and `suggest`.

Standard-library HTTP only, so the commands start fast and run anywhere
Python does (a laptop with a `kubectl port-forward`, a debug container).
Every failure becomes an AdminError whose message says what to do next.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlencode

DEFAULT_SERVER = "http://127.0.0.1:9090"
SERVER_ENV = "EGRESS_AUTHZ_SERVER"


def default_server() -> str:
    return os.environ.get(SERVER_ENV) or DEFAULT_SERVER


class AdminError(Exception):
    """Anything that went wrong talking to the admin endpoint; str() is for people."""


class AdminUnreachable(AdminError):
    pass


class AdminNotFound(AdminError):
    pass


def normalise_server(server: str) -> str:
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = "http://" + server
    return server


class AdminClient:
    def __init__(self, server: str | None = None, *, timeout: float = 10.0) -> None:
        self.server = normalise_server(server or default_server())
        self.timeout = timeout

    # -- API ---------------------------------------------------------------

    def decisions(self, **filters: Any) -> list[dict[str, Any]]:
        """Recorded decisions matching `filters`, newest first."""
        body = self._get_json("/v1/decisions", filters)
        decisions: list[dict[str, Any]] = body.get("decisions", [])
        return decisions

    def decision(self, decision_id: str) -> dict[str, Any]:
        found: dict[str, Any] = self._get_json(f"/v1/decisions/{quote(decision_id, safe='')}", {})
        return found

    def stream(self, *, stall_timeout: float = 60.0, **filters: Any) -> Iterator[dict[str, Any]]:
        """Live decisions as they are recorded (server-sent events).

        The server sends a heartbeat every 15 s; `stall_timeout` without a
        byte means the server or the network went away.
        """
        resp = self._open("/v1/decisions/stream", filters, timeout=stall_timeout)
        with resp:
            data: list[str] = []
            while True:
                try:
                    raw = resp.readline()
                except TimeoutError as e:
                    raise AdminUnreachable(
                        f"the decision stream from {self.server} went silent for {stall_timeout:g}s"
                    ) from e
                except OSError as e:
                    raise AdminUnreachable(
                        f"the decision stream from {self.server} broke: {e}"
                    ) from e
                if not raw:
                    return  # the server closed the stream (shutdown, or a limit reached)
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data:
                        yield json.loads("\n".join(data))
                        data = []
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                # "event:", "id:" and ":" comments (heartbeats) carry nothing more.

    # -- plumbing ------------------------------------------------------------

    def _url(self, path: str, params: Mapping[str, Any]) -> str:
        query = {k: str(v) for k, v in params.items() if v is not None and v != ""}
        return self.server + path + ("?" + urlencode(query) if query else "")

    def _open(self, path: str, params: Mapping[str, Any], timeout: float | None = None) -> Any:
        url = self._url(path, params)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            message = _error_text(e)
            if e.code == 404:
                raise AdminNotFound(message) from e
            raise AdminError(f"{self.server} answered {e.code}: {message}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise AdminUnreachable(
                f"cannot reach the egress-authz admin endpoint at {self.server}: {reason}\n"
                f"Is `egress-authz serve` running with --admin-address there? In a cluster: "
                f"kubectl -n egress-authz port-forward deploy/egress-authz 9090, "
                f"or pass --server / set {SERVER_ENV}."
            ) from e

    def _get_json(self, path: str, params: Mapping[str, Any]) -> Any:
        with self._open(path, params) as resp:
            try:
                return json.load(resp)
            except ValueError as e:
                raise AdminError(f"{self.server}{path} did not answer JSON: {e}") from e


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
    except ValueError:
        return str(e.reason)
    return str(body.get("error") or e.reason) if isinstance(body, dict) else str(e.reason)
