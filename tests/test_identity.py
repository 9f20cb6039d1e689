"""authz.identity: who is calling, from the principal and the Pod at the source address."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from authz.engine import compile_policy, decide
from authz.identity import (
    IdentityResolver,
    UnknownWorkloads,
    canonical_ip,
    parse_principal,
    verify,
)
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
    Workload,
    WorkloadSelector,
)

CART = "spiffe://cluster.local/ns/shop/sa/cart"
CART_POD = Workload("shop", "cart", MappingProxyType({"function": "finance"}), "cart-1",
                    "10.0.0.7", ("10.0.0.7",))


def snapshot(mode: Mode = Mode.ENFORCE):  # type: ignore[no-untyped-def]
    rules = (
        Rule("any-cart", 0, ("api.kadath.io",),
             workloads=WorkloadSelector(service_accounts=frozenset({"cart"}))),
        Rule("finance", 1, ("payments.kadath.io",),
             workloads=WorkloadSelector(match_labels=MappingProxyType({"function": "finance"}))),
    )
    policy = NamespacePolicy(ConfigMapRef("shop", "p"), Tier.NAMESPACE, mode, rules)
    return compile_policy(PolicySet((policy,), revision=1))


def tls(host: str) -> Destination:
    return Destination(port=443, protocol=Protocol.TLS, sni=host)


class TestCanonicalIp:
    @pytest.mark.parametrize(("text", "canonical"), [
        ("10.0.0.7", "10.0.0.7"),
        ("fd00::1", "fd00::1"),
        ("fd00::0001", "fd00::1"),
        ("FD00:0:0:0:0:0:0:1", "fd00::1"),
        ("fd00:10:0:0:0:0:0:7", "fd00:10::7"),
        ("::ffff:10.0.0.7", "10.0.0.7"),
        ("::ffff:a00:7", "10.0.0.7"),
        ("::1", "::1"),
    ])
    def test_one_spelling_per_address(self, text: str, canonical: str) -> None:
        """IPv6 in RFC 5952 form, IPv4-mapped IPv6 as its IPv4 address."""
        assert canonical_ip(text) == canonical

    @pytest.mark.parametrize("text", ["", "cart", "10.0.0", "10.0.0.07", "10.0.0.7:80",
                                      "[fd00::1]", "fd00::1::2", "1" * 300])
    def test_not_an_address(self, text: str) -> None:
        """What no socket peer looks like is no address (and indexes nothing)."""
        assert canonical_ip(text) is None


    def test_overlong_text_is_refused_unparsed_and_uncached(self) -> None:
        """A source address only Envoy should write is still hostile input: long text is
        no address, is not kept in the cache, and is echoed clipped."""
        from authz.identity import _canonical_ip

        before = _canonical_ip.cache_info().currsize
        huge = "f" * 100_000
        assert canonical_ip(huge) is None
        assert _canonical_ip.cache_info().currsize == before
        message = verify(Identity(CART, huge, None, True), "cluster.local")[3]
        assert len(message) < 400 and message.count("f" * 64) == 1


class TestResolver:
    def test_finds_the_pod_and_requires_one(self) -> None:
        """With a Pod source and the default, the Identity carries the Pod and requires it."""
        asked: list[str] = []

        def lookup(ip: str) -> Workload | None:
            asked.append(ip)
            return CART_POD if ip == "10.0.0.7" else None

        resolve = IdentityResolver(lookup)
        found = resolve(CART, "10.0.0.7")
        assert (found.principal, found.source_ip, found.workload) == (CART, "10.0.0.7", CART_POD)
        assert found.pod_required and resolve.requires_pod
        missing = resolve(CART, "10.0.0.9")
        assert missing.workload is None and missing.pod_required
        assert resolve(CART, "").workload is None  # nothing to look up
        assert asked == ["10.0.0.7", "10.0.0.9"]

    def test_allow_unknown_requires_nothing(self) -> None:
        """--unknown-workloads allow: Pods are still found, a miss is no denial."""
        resolve = IdentityResolver(lambda ip: None, UnknownWorkloads.ALLOW)
        assert not resolve(CART, "10.0.0.9").pod_required

    def test_without_a_pod_source_nothing_is_required(self) -> None:
        """No Pod source (file mode without --workloads): the principal alone."""
        identity = IdentityResolver(None)(CART, "10.0.0.9")
        assert identity.workload is None and not identity.pod_required


class TestVerify:
    def test_trusted_caller(self) -> None:
        """Principal in the trust domain, its own Pod at the address: namespace and account."""
        assert verify(Identity(CART, "10.0.0.7", CART_POD, True), "cluster.local") == (
            "shop", "cart", None, "")

    def test_unknown_workload(self) -> None:
        """No Pod at the address where one is required: unknown-workload, saying where."""
        ns, sa, reason, message = verify(Identity(CART, "10.0.0.9", None, True), "cluster.local")
        assert (ns, sa, reason) == ("shop", "cart", Reason.UNKNOWN_WORKLOAD)
        assert "10.0.0.9" in message and "shop/cart" in message

    def test_untrusted_principal_is_reported_first(self) -> None:
        """A foreign principal is untrusted-identity, whatever the address."""
        identity = Identity("spiffe://evil/ns/shop/sa/cart", "10.0.0.9", None, True)
        assert verify(identity, "cluster.local")[2] is Reason.UNTRUSTED_IDENTITY

    def test_other_pods_address(self) -> None:
        """Another service account's Pod at the address: identity-mismatch."""
        frontend = Workload("shop", "frontend", name="fe-1", ip="10.0.0.8")
        reason = verify(Identity(CART, "10.0.0.8", frontend, True), "cluster.local")[2]
        assert reason is Reason.IDENTITY_MISMATCH
        other_ns = Workload("web", "cart", name="cart-1", ip="10.0.0.8")
        assert verify(Identity(CART, "10.0.0.8", other_ns), "cluster.local")[2] is (
            Reason.IDENTITY_MISMATCH)

    def test_principal_parser_is_shared(self) -> None:
        """The engine's parse_principal is this one (the `check` command imports it there)."""
        from authz import engine

        assert engine.parse_principal is parse_principal


class TestDecide:
    def test_unknown_workload_is_denied_even_for_service_account_rules(self) -> None:
        """The attack: cart's certificate from an address no Pod has, for a rule that
        selects by service account only. Denied, with who and why in the Decision."""
        d = decide(snapshot(), Identity(CART, "10.0.0.9", None, True), tls("api.kadath.io"))
        assert (d.allowed, d.verdict, d.reason) == (False, Verdict.DENY, Reason.UNKNOWN_WORKLOAD)
        assert d.workload == "shop/cart" and "10.0.0.9" in d.message

    def test_audit_mode_does_not_lift_it(self) -> None:
        """Audit mode relaxes a namespace's rules, never who the caller is."""
        d = decide(snapshot(Mode.AUDIT), Identity(CART, "10.0.0.9", None, True),
                   tls("api.kadath.io"))
        assert (d.allowed, d.reason) == (False, Reason.UNKNOWN_WORKLOAD)

    def test_opt_out_trusts_the_principal_alone(self) -> None:
        """--unknown-workloads allow: service-account rules apply, label rules cannot."""
        identity = Identity(CART, "10.0.0.9", None, False)
        assert decide(snapshot(), identity, tls("api.kadath.io")).allowed
        denied = decide(snapshot(), identity, tls("payments.kadath.io"))
        assert denied.reason is Reason.HOST_NOT_ALLOWED
        assert any("no Pod is known" in c.why for c in denied.explanation)

    def test_known_pod_gets_its_label_rules(self) -> None:
        """Control: the cart Pod at its own address reaches both hosts."""
        identity = Identity(CART, "10.0.0.7", CART_POD, True)
        assert decide(snapshot(), identity, tls("api.kadath.io")).allowed
        assert decide(snapshot(), identity, tls("payments.kadath.io")).allowed


class TestExplained:
    def test_explain_and_the_decision_log_say_why(self) -> None:
        """`explain` shows that no Pod is known at the address and what to do; the
        decision-log line carries the reason, the source address and no Pod."""
        import json

        from authz.commands.explain import render
        from authz.observe.decisionlog import log_line, record_detail
        from authz.records import DecisionRecord

        identity = Identity(CART, "10.0.0.9", None, True)
        d = decide(snapshot(), identity, tls("api.kadath.io"))
        rec = DecisionRecord(d, identity, tls("api.kadath.io"), 1, 1)
        text = render(record_detail(rec))
        assert "DENY (unknown-workload)" in text and "none known for 10.0.0.9" in text
        assert "--unknown-workloads" in text and "outside its Pod" in text
        line = json.loads(log_line(rec, None))
        assert (line["reason"], line["source_ip"], line["pod"]) == (
            "unknown-workload", "10.0.0.9", None)

    def test_reason_is_a_documented_contract(self) -> None:
        """`unknown-workload` is in the README's reason table, with its opt-out flag, and
        the flag and chart value are in the docs that tell operators when to use them."""
        from pathlib import Path

        root = Path(__file__).resolve().parents[1]
        readme = (root / "README.md").read_text()
        row = next(line for line in readme.splitlines() if line.startswith("| `unknown-workload`"))
        assert "--unknown-workloads allow" in row
        security = (root / "docs" / "security.md").read_text()
        assert "## Workload identity" in security
        assert "--unknown-workloads allow" in security and "unknownWorkloads=allow" in security
        assert Reason.UNKNOWN_WORKLOAD.value == "unknown-workload"
