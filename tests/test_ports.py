"""Which port is judged: the connection's (gateway listener -> Service port), never Host's.

Issue 10 item 4 (a Host port that differs from the connection's is `port-mismatch`) and
issue 11 item 2 (the gateway listener port is translated back to the port the app dialled).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from authz.engine import compile_policy, decide
from authz.loader import build_policy_set
from authz.model import ALWAYS_ENFORCED, Destination, Identity, Protocol, Reason, Verdict, Workload
from authz.policy import parse_configmap


def cm(body: str, namespace: str = "shop") -> dict[str, Any]:
    return {
        "kind": "ConfigMap",
        "metadata": {"name": "egress-policy", "namespace": namespace,
                     "labels": {"egress-authz.io/policy": "true"}},
        "data": {"policy.yaml": body},
    }


POLICY = """
mode: {mode}
rules:
  - name: tls-only
    hosts: [api.kadath.io]
    ports: [443]
  - name: web
    hosts: [web.kadath.io]
    ports: [80]
"""


def snapshot(mode: str = "enforce"):
    policy = parse_configmap(cm(POLICY.format(mode=mode)), cluster_namespace="egress-authz")
    return compile_policy(build_policy_set([policy], revision=1))


CART = Identity(
    "spiffe://cluster.local/ns/shop/sa/cart", "10.0.0.9",
    Workload("shop", "cart", MappingProxyType({}), "cart-1", "10.0.0.9"),
)


def http(host: str, port: int, sni: str | None = None) -> Destination:
    return Destination(port, Protocol.HTTP, sni=sni, http_host=host, method="GET", path="/")


class TestHostPortCannotChooseThePort:
    """Issue 10.4: the Host header's port never overrides the connection's port."""

    def test_host_443_on_the_plain_http_listener_is_denied(self) -> None:
        """The attack: cleartext on port 80 with `Host: api.kadath.io:443` must not pass
        a rule that allows api.kadath.io on 443 only."""
        d = decide(snapshot(), CART, http("api.kadath.io:443", 80))
        assert (d.allowed, d.verdict, d.reason) == (False, Verdict.DENY, Reason.PORT_MISMATCH)
        assert "443" in d.message and "80" in d.message

    def test_mismatch_is_enforced_in_audit_mode(self) -> None:
        """Audit mode does not lift port-mismatch: it is about the request, not the policy."""
        assert Reason.PORT_MISMATCH in ALWAYS_ENFORCED
        d = decide(snapshot("audit"), CART, http("api.kadath.io:443", 80))
        assert (d.allowed, d.verdict, d.reason) == (False, Verdict.DENY, Reason.PORT_MISMATCH)

    def test_host_without_port_is_judged_on_the_connection_port(self) -> None:
        """No port in Host: the connection's port decides (80 is not allowed for api)."""
        d = decide(snapshot(), CART, http("api.kadath.io", 80))
        assert (d.allowed, d.reason) == (False, Reason.PORT_NOT_ALLOWED)
        assert decide(snapshot(), CART, http("web.kadath.io", 80)).allowed

    @pytest.mark.parametrize("host", ["web.kadath.io:80", "WEB.kadath.io:80", "web.kadath.io.:80"])
    def test_host_naming_the_connection_port_is_fine(self, host: str) -> None:
        """`Host: x:80` on port 80 is the default port spelt out: allowed."""
        assert decide(snapshot(), CART, http(host, 80)).allowed

    def test_host_port_lower_than_connection_is_a_mismatch_too(self) -> None:
        """The other direction: `Host: web.kadath.io:80` on a 443 connection is denied,
        not judged as 80."""
        d = decide(snapshot(), CART, http("web.kadath.io:80", 443, sni="web.kadath.io"))
        assert d.reason is Reason.PORT_MISMATCH

    def test_tls_host_with_its_own_port(self) -> None:
        """HTTP over TLS on 443 with `Host: api.kadath.io:443` and the same SNI is allowed."""
        d = decide(snapshot(), CART, http("api.kadath.io:443", 443, sni="api.kadath.io"))
        assert d.allowed

    def test_reason_is_documented_and_explained(self) -> None:
        """port-mismatch is in the README's reason table and `explain` says what to change."""
        from pathlib import Path

        from authz.commands.explain import render

        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        assert "| `port-mismatch` | deny |" in readme
        d = decide(snapshot(), CART, http("api.kadath.io:443", 80))
        text = render({"decision_id": d.decision_id, "verdict": d.verdict.value,
                       "reason": d.reason.value, "message": d.message})
        assert "names a port other than the one the connection" in text
        assert "kubectl" not in text  # not a policy matter: no ConfigMap to edit
