"""Every spelling a resolver or libc would read as an IPv4 address is an IP literal.

glibc's inet_aton (and so getaddrinfo, curl, many HTTP clients) and the WHATWG URL
host parser accept 1 to 4 dot-separated parts, each decimal, octal (leading 0) or
hex (0x): `127.1`, `2130706433`, `0x7f000001`, `0177.0.0.1`, `127.0.0.0x1`. Such a
"name" reaches an address, not a host, so it is refused in every mode.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz import hosts
from authz.engine import compile_policy, decide
from authz.model import (
    ConfigMapRef,
    Destination,
    Identity,
    Mode,
    NamespacePolicy,
    PolicySet,
    Protocol,
    Reason,
    Rule,
    Tier,
    Verdict,
)

SPELLINGS = [
    "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0X7F000001",
    "127.0.0.0x1", "0x7f.0x0.0x0.0x1", "0x7f.1", "0177.0.0.1", "0177.0.0.01", "017700000001",
    "0x7f.0.0.1", "127.0.0.1.", "0x7f000001.", "1.2.3.0x", "0x", "00", "0", "4294967295",
    "0xffffffff", "10.0.0x0.1", # Full-width forms, which IDNA maps to ASCII digits:
    "\uff10\uff58\uff17\uff46\uff10\uff10\uff10\uff10\uff10\uff11",
    "\uff11\uff12\uff17.\uff10.\uff10.\uff11",
]


def audit_snapshot():  # type: ignore[no-untyped-def]
    """One namespace in audit mode with a rule that allows a real name."""
    rule = Rule(name="r", index=0, hosts=("api.kadath.io",))
    policy = NamespacePolicy(ConfigMapRef("shop", "p"), Tier.NAMESPACE, Mode.AUDIT, (rule,))
    return compile_policy(PolicySet((policy,), revision=1))


def audit_verdict(sni: str | None = None, host: str | None = None) -> tuple[Verdict, Reason]:
    dest = Destination(port=443 if host is None else 80,
                       protocol=Protocol.TLS if host is None else Protocol.HTTP,
                       sni=sni, http_host=host, method="GET", path="/")
    d = decide(audit_snapshot(), Identity("spiffe://cluster.local/ns/shop/sa/cart"), dest)
    return d.verdict, d.reason


class TestTable:
    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_normalize_says_ip_literal(self, spelling: str) -> None:
        """Each spelling is refused as an IP literal, as SNI and as Host."""
        for with_port in (False, True):
            with pytest.raises(hosts.HostError) as info:
                hosts.normalize(spelling, with_port=with_port)
            assert info.value.reason is Reason.IP_LITERAL, info.value.message
        with pytest.raises(hosts.HostError) as info:
            hosts.normalize(spelling + ":443", with_port=True)
        assert info.value.reason is Reason.IP_LITERAL

    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_audit_mode_denies(self, spelling: str) -> None:
        """In an audit namespace every spelling is denied (ip-literal), never audited:
        the issue's `0x7f000001` got verdict audit while 127.0.0.1 was denied."""
        assert audit_verdict(sni=spelling) == (Verdict.DENY, Reason.IP_LITERAL)
        assert audit_verdict(host=spelling) == (Verdict.DENY, Reason.IP_LITERAL)

    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_policy_pattern_refused(self, spelling: str) -> None:
        """Nor can a policy name one, plain or under a wildcard."""
        with pytest.raises(hosts.PatternError, match="IP address"):
            hosts.parse_pattern(spelling)
        if "." in spelling.rstrip(".")[:-1]:
            with pytest.raises(hosts.PatternError):
                hosts.parse_pattern("*." + spelling.split(".", 1)[1])

    @pytest.mark.parametrize("name", [
        "0x7f.example.com", "api.0x1.io", "x0x1.example", "a.b0x1", "0xcafe.net",
        "deadbeef.com", "cafe", "a.0xg", "1a.example", "127.0.0.1x",
    ])
    def test_names_that_only_look_numeric_stay_names(self, name: str) -> None:
        """Only a last label of digits or 0x-hex makes an address; hex-looking inner
        labels and letters after digits are names."""
        assert hosts.normalize(name) == name.lower()


OCTET = st.integers(min_value=0, max_value=255)


def _spell(value: int, style: str) -> str:
    if style == "hex":
        return hex(value)
    if style == "HEX":
        return "0X" + format(value, "X")
    if style == "oct":
        return "0" + format(value, "o")
    return str(value)


@st.composite
def ipv4_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """(spelling, dotted quad) in the 1- to 4-part forms inet_aton reads."""
    octets = draw(st.lists(OCTET, min_size=4, max_size=4))
    parts_n = draw(st.integers(min_value=1, max_value=4))
    # The last part carries the remaining bytes, as in inet_aton's a.b.c.d / a.b.c / a.b / a.
    head = octets[: parts_n - 1]
    tail = 0
    for o in octets[parts_n - 1:]:
        tail = tail * 256 + o
    styles = st.sampled_from(["dec", "hex", "HEX", "oct"])
    parts = [_spell(v, draw(styles)) for v in [*head, tail]]
    return ".".join(parts), ".".join(map(str, octets))


@given(ipv4_spellings(), st.booleans())
def test_every_inet_aton_spelling_is_an_ip_literal(case: tuple[str, str], dot: bool) -> None:
    """Property: whatever spelling libc's inet_aton reads as an address (checked against
    the real inet_aton), hosts says ip-literal, and audit mode denies it."""
    spelling, quad = case
    assert socket.inet_aton(spelling) == ipaddress.IPv4Address(quad).packed
    spelling += "." if dot else ""
    _, _, reason, _ = hosts.normalize_or_reason(spelling)
    assert reason is Reason.IP_LITERAL
    assert audit_verdict(sni=spelling) == (Verdict.DENY, Reason.IP_LITERAL)


class TestLoopbackNames:
    """Names every resolver answers with a loopback address (RFC 6761: `localhost`
    and everything under it; the aliases Kubernetes writes into each pod's
    /etc/hosts). Allowed in a policy, they would let a namespace owner route its
    workloads, through the gateway, to the gateway itself (its Envoy admin on
    127.0.0.1:15000 can drain or stop it): an address in a name's clothing."""

    @pytest.mark.parametrize("name", [
        "localhost", "LOCALHOST.", "foo.localhost", "a.b.localhost", "localhost.localdomain",
        "ip6-localhost", "ip6-loopback",
    ])
    @pytest.mark.parametrize("tier", [Tier.NAMESPACE, Tier.CLUSTER])
    def test_refused_in_policies(self, name: str, tier: Tier) -> None:
        """In either tier, with a located error that says why."""
        from authz.policy import PolicyError, parse_configmap

        ns = "egress-authz" if tier is Tier.CLUSTER else "shop"
        labels = {"egress-authz.io/tier": "cluster"} if tier is Tier.CLUSTER else {
            "egress-authz.io/policy": "true"}
        cm = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": "p", "namespace": ns, "labels": labels},
              "data": {"policy.yaml": f"rules: [{{name: r, hosts: ['{name}'], ports: [15000]}}]"}}
        with pytest.raises(PolicyError) as info:
            parse_configmap(cm, cluster_namespace="egress-authz")
        (problem,) = info.value.problems
        assert "loopback" in problem and "hosts[0]" in problem

    @pytest.mark.parametrize("name", ["localhost.example.com", "mylocalhost", "localhost-api.io"])
    def test_names_that_only_contain_it_stay_names(self, name: str) -> None:
        """Only `localhost` itself, names under it and the /etc/hosts aliases are refused."""
        assert hosts.loopback_problem(hosts.parse_pattern(name)) is None
