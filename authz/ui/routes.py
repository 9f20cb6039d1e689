"""The page's routes on the admin endpoint: its static files and the views
that `explain` and `suggest` give on the command line, as JSON.

`answer()` is called by the admin handler for any path it does not serve
itself; it returns None for a path that is not ours (the admin answers 404).
Every answer here carries a strict Content-Security-Policy: the page shows
text an attacker chose (hosts, paths, SNI, labels), so no inline script or
style may run, and nothing is fetched from anywhere but this endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..model import Reason

if TYPE_CHECKING:
    from ..observe.recorder import DecisionRecorder

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
# The files the page is made of, and nothing else: a fixed list, so no path
# from a URL ever reaches the file system.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Namespace view: how far back by default, and the most buckets in its chart.
DEFAULT_WINDOW = "1h"
CHART_BUCKETS = 30


@dataclass(frozen=True, slots=True)
class Answer:
    status: HTTPStatus
    content_type: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: SECURITY_HEADERS)


def static_file(name: str) -> Answer | None:
    if name not in STATIC:
        return None
    data = resources.files(__package__).joinpath("static", name).read_bytes()
    return Answer(HTTPStatus.OK, STATIC[name], data)


def _json(status: HTTPStatus, body: Any) -> Answer:
    data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
    return Answer(status, "application/json", data)


def answer(
    path: str, params: dict[str, list[str]], recorder: DecisionRecorder | None
) -> Answer | None:
    """The answer for `path`, or None when the path is not the page's."""
    if path == "/":
        return static_file("index.html")
    if path.startswith("/ui/"):
        return static_file(path.removeprefix("/ui/"))
    if path == "/v1/reasons":
        return _json(HTTPStatus.OK, {"reasons": [r.value for r in Reason]})
    is_explanation = path.startswith("/v1/explanations/")
    is_namespace = path == "/v1/namespaces" or path.startswith("/v1/namespaces/")
    if not (is_explanation or is_namespace):
        return None
    if recorder is None:
        return _json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "decision recording is off"})
    from . import views

    if path == "/v1/namespaces":
        return _json(HTTPStatus.OK, {"namespaces": views.namespaces(recorder)})

    if is_explanation:
        decision_id = unquote(path.removeprefix("/v1/explanations/"))
        found = views.explanation(recorder, decision_id)
        if found is None:
            return _json(
                HTTPStatus.NOT_FOUND,
                {
                    "error": f"decision {decision_id} is not in the buffer (too old, "
                    "from another replica, or never recorded)"
                },
            )
        return _json(HTTPStatus.OK, found)
    namespace, _, what = unquote(path.removeprefix("/v1/namespaces/")).partition("/")
    if not namespace or what not in ("", "suggest"):
        return None
    since = _one(params, "since") or DEFAULT_WINDOW
    if what == "suggest":
        wildcards = (_one(params, "wildcards") or "").lower() in ("1", "true", "yes")
        return _json(HTTPStatus.OK, views.suggestion(recorder, namespace, since, wildcards))
    return _json(HTTPStatus.OK, views.namespace_summary(recorder, namespace, since, CHART_BUCKETS))


def _one(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    return (values[-1].strip() or None) if values else None

