"""Run the scenario's calls and pair each with the decision the service recorded.

What the client saw (the stand-in's answer, a 403 with its reason, or a
closed connection) comes from the call itself; the verdict and reason come
from the service's admin API: the first decision recorded for the call's pod
address since the previous call. Calls run one at a time and nothing else
talks to the service, so that match is exact.
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from typing import Any

from authz.commands.admin_client import AdminClient, AdminError
from authz.testing.clients import http_via_gateway, tls_via_sidecar

from .scenario import Call, Via
from .stack import DemoStack

CALL_TIMEOUT = 5.0
DECISION_WAIT = 5.0  # the recorder flushes every 50 ms; this allows for a busy machine


@dataclass
class Outcome:
    call: Call
    saw: str  # what the client saw, for people
    through: bool  # the stand-in host answered
    decision: dict[str, Any] | None  # the admin API's record of the Check
    connections: int = 0  # TCP connections the stand-in hosts accepted during the call

    @property
    def verdict(self) -> str:
        return str(self.decision["verdict"]) if self.decision else "-"

    @property
    def reason(self) -> str:
        return str(self.decision["reason"]) if self.decision else "(no decision recorded)"

    @property
    def decision_id(self) -> str | None:
        return str(self.decision["decision_id"]) if self.decision else None

    @property
    def as_expected(self) -> bool:
        c = self.call
        return (
            self.verdict == c.expect_verdict
            and self.reason == c.expect_reason
            and self.through == c.expect_through
            and not self.leaked
        )

    @property
    def leaked(self) -> bool:
        """A denied call that still opened a connection to an external host."""
        return not self.call.expect_through and self.connections > 0


def run_calls(stack: DemoStack, calls: tuple[Call, ...]) -> list[Outcome]:
    admin = AdminClient(stack.admin_url, timeout=5.0)
    seen = {d["decision_id"] for d in _recent(admin)}
    outcomes = []
    for call in calls:
        before = _accepts(stack)
        saw, through = _call(stack, call)
        decision = _new_decision(admin, seen, call)
        outcomes.append(Outcome(call, saw, through, decision, _accepts(stack) - before))
    return outcomes


def _accepts(stack: DemoStack) -> int:
    return sum(s.accepts for s in stack.stand_ins.values())


def _call(stack: DemoStack, call: Call) -> tuple[str, bool]:
    if call.via is Via.TLS:
        return _tls(stack, call)
    if call.via is Via.HTTP:
        return _http(stack, call)
    return _raw_http(stack, call)


def _tls(stack: DemoStack, call: Call) -> tuple[str, bool]:
    # The app's own HTTPS: TLS to the host's name, verified against the
    # host's certificate, with an HTTP request inside that only the host reads.
    port = stack.ports.sidecars[call.pod.name][0]
    request = (
        f"GET {call.path} HTTP/1.1\r\nHost: {call.host}\r\nConnection: close\r\n\r\n"
    ).encode()
    result = tls_via_sidecar(
        port, call.host, ca_path=str(stack.ca_path), payload=request, timeout=CALL_TIMEOUT
    )
    if result.reply is None:
        return "connection closed", False
    head, _, body = result.reply.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return f"not HTTP: {result.reply[:40]!r}", True
    return _describe(status, body)


def _http(stack: DemoStack, call: Call) -> tuple[str, bool]:
    port = stack.ports.sidecars[call.pod.name][1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT)
    try:
        conn.request("GET", call.path, headers={"Host": call.host})
        resp = conn.getresponse()
        return _describe(resp.status, resp.read())
    except (OSError, http.client.HTTPException):
        return "connection closed", False
    finally:
        conn.close()


def _raw_http(stack: DemoStack, call: Call) -> tuple[str, bool]:
    # Straight to the gateway with a certificate and SNI of our choosing, from
    # the pod's own address: what a compromised pod could do without its sidecar.
    owner = call.certificate_of or call.pod
    try:
        result = http_via_gateway(
            stack.ports.gateway_http,
            call.host,
            credential=stack.identity(owner),
            ca_path=str(stack.ca_path),
            path=call.path,
            source_ip=call.pod.ip,
            sni=call.sni or call.host,
            timeout=CALL_TIMEOUT,
        )
    except (OSError, http.client.HTTPException):
        return "connection closed", False
    return _describe(result.status, result.body)


def _describe(status: int, body: bytes) -> tuple[str, bool]:
    if status == 200:
        try:
            host = json.loads(body)["host"]
        except (ValueError, KeyError, TypeError):
            host = "?"
        return f"200 from {host}", True
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        reason = None
    return (f"{status} {reason}" if reason else f"{status}"), False


def _recent(admin: AdminClient) -> list[dict[str, Any]]:
    try:
        return admin.decisions(limit=100)
    except AdminError:
        return []


def _new_decision(admin: AdminClient, seen: set[str], call: Call) -> dict[str, Any] | None:
    """The first decision recorded since the previous call for this call's pod
    address (so that a record arriving late is never given to the next call)."""
    deadline = time.monotonic() + DECISION_WAIT
    while True:
        new: list[dict[str, Any]] = [
            d for d in reversed(_recent(admin))  # oldest first
            if d["decision_id"] not in seen and d.get("source_ip") == call.pod.ip
        ]
        if new:
            seen.add(new[0]["decision_id"])
            return new[0]
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
