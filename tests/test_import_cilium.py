"""`egress-authz import --from cilium`: documented examples, and never wider than Cilium."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.import_helpers import (
    Judge,
    dump,
    hostnames,
    import_objects,
    lint_output,
    near,
    outcome_of,
)

# --------------------------------------------------------------------------
# Cilium's matching, implemented here from its documentation
# (docs.cilium.io, Security > Policy > Layer 3 > "DNS based"; `**.` per the
# 1.19 upgrade notes), independently of the importer.


def cilium_matches(selector: dict[str, str], name: str) -> bool:
    name = name.lower().rstrip(".")
    if "matchName" in selector:
        return name == selector["matchName"].lower().rstrip(".")
    pattern = selector["matchPattern"].lower().rstrip(".")
    if pattern == "*":
        return True
    prefix = ""
    if pattern.startswith("**."):
        prefix, pattern = r"([-a-z0-9]+\.)+", pattern[3:]
    regex = prefix + "".join("[-a-z0-9]*" if c == "*" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name) is not None


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = policy["spec"]["endpointSelector"].get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


def _port_ok(rule: dict[str, Any], port: int, protocol: str) -> bool:
    if "toPorts" not in rule:
        return True
    for entry in rule["toPorts"]:
        if "rules" in entry:
            continue  # L7 HTTP rules: this model lets nothing through them (strictest reading)
        for p in entry["ports"]:
            if p.get("protocol", "ANY") in ("TCP", "ANY") and int(p["port"]) == port:
                return True
    return False


def cilium_allows(policies: list[dict[str, Any]], labels: dict[str, str], host: str,
                  port: int, protocol: str) -> bool:
    selecting = [p for p in policies if _selects(p, labels)]
    for p in selecting:
        for rule in p["spec"].get("egressDeny", []):
            if any(cilium_matches(s, host) for s in rule.get("toFQDNs", [])):
                return False
    return any(
        any(cilium_matches(s, host) for s in rule.get("toFQDNs", []))
        and _port_ok(rule, port, protocol)
        for p in selecting
        for rule in p["spec"].get("egress", [])
    )


def cnp(name: str, egress: list[dict[str, Any]], *, labels: dict[str, str] | None = None,
        deny: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"endpointSelector": {"matchLabels": labels or {}}, "egress": egress}
    if deny:
        spec["egressDeny"] = deny
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "shop"}, "spec": spec}


class TestDocumentedExamples:
    """The examples of Cilium's DNS-based policy documentation, both sides."""

    def test_the_model_follows_the_documentation(self) -> None:
        """The test's own model of Cilium matches the documented examples."""
        one = {"matchPattern": "*.cilium.io"}
        assert cilium_matches(one, "sub.cilium.io")
        assert not cilium_matches(one, "cilium.io")
        assert not cilium_matches(one, "sub.sub.cilium.io")
        part = {"matchPattern": "part*ial.com"}
        assert cilium_matches(part, "partial.com") and cilium_matches(part, "part-extra-ial.com")
        deep = {"matchPattern": "**.cilium.io"}
        assert cilium_matches(deep, "app.cilium.io") and cilium_matches(deep, "test.app.cilium.io")
        assert not cilium_matches(deep, "cilium.io")
        assert cilium_matches({"matchPattern": "*"}, "anything.example")

    def test_each_documented_form_is_translated_or_refused_as_documented(self) -> None:
        """matchName and `**.` carry over exactly; one-label, partial and bare `*` are refused."""
        policy = cnp("fqdn", [{
            "toFQDNs": [
                {"matchName": "my-remote-service.com"},
                {"matchPattern": "**.cilium.io"},
                {"matchPattern": "*.cilium.io"},
                {"matchPattern": "part*ial.com"},
                {"matchPattern": "*"},
            ],
            "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}],
        }], labels={"app": "cart"})
        result = import_objects("cilium", {"p.yaml": dump(policy)})
        assert outcome_of(result, '"my-remote-service.com"') == "exact"
        assert outcome_of(result, '"**.cilium.io"') == "exact"
        for refused in ('"*.cilium.io"', '"part*ial.com"', 'matchPattern "*"'):
            assert outcome_of(result, refused) == "not-translatable"
        judge = Judge(result)
        cart = {"app": "cart"}
        assert judge.allows("my-remote-service.com", 443, labels=cart)
        assert judge.allows("test.app.cilium.io", 443, labels=cart)
        assert not judge.allows("cilium.io", 443, labels=cart)
        assert not judge.allows("partial.com", 443, labels=cart)
        assert not judge.allows("my-remote-service.com", 8443, labels=cart)
        assert not judge.allows("my-remote-service.com", 443, labels={"app": "web"})

    def test_non_name_peers_ingress_and_dns_rules_are_reported(self) -> None:
        """toCIDR, DNS-only rules and ingress are each a not-translatable line, with a reason."""
        policy = cnp("mixed", [
            {"toCIDR": ["10.0.0.0/8"]},
            {"toEndpoints": [{"matchLabels": {"k8s-app": "kube-dns"}}],
             "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                          "rules": {"dns": [{"matchPattern": "*"}]}}]},
            {"toFQDNs": [{"matchName": "api.kadath.io"}]},
        ])
        policy["spec"]["ingress"] = [{"fromEndpoints": [{}]}]
        result = import_objects("cilium", {"p.yaml": dump(policy)})
        assert outcome_of(result, "egress[0] toCIDR") == "not-translatable"
        assert outcome_of(result, "egress[1] toEndpoints") == "not-translatable"
        assert outcome_of(result, "ingress") == "not-translatable"
        # No toPorts means every port in Cilium: we write 443 and 80, and say it is narrower.
        assert outcome_of(result, '"api.kadath.io"') == "narrower"

    def test_an_fqdn_deny_removes_overlapping_allows(self) -> None:
        """An egressDeny on a name takes every overlapping allow away, not only the name."""
        policy = cnp("d", [{"toFQDNs": [{"matchPattern": "**.kadath.io"}]}],
                     deny=[{"toFQDNs": [{"matchName": "secret.kadath.io"}]}])
        judge = Judge(import_objects("cilium", {"p.yaml": dump(policy)}))
        assert not judge.allows("secret.kadath.io", 443)
        assert not judge.allows("api.kadath.io", 443)  # the whole wildcard went: narrower

    def test_output_passes_lint(self, tmp_path, capsys) -> None:
        """What the import prints is accepted by `egress-authz lint`."""
        policy = cnp("ok", [{"toFQDNs": [{"matchName": "api.kadath.io"},
                                         {"matchPattern": "**.leng.com"}],
                             "toPorts": [{"ports": [{"port": "443"}, {"port": "8000",
                                                                       "endPort": 8002}]}]}],
                     labels={"k8s:app": "cart"})
        report = lint_output(import_objects("cilium", {"p.yaml": dump(policy)}), tmp_path, capsys)
        assert report["rules"] == 1


# --------------------------------------------------------------------------
# Generated policies and requests: ours never allows what Cilium denies.

selectors = st.one_of(
    st.builds(lambda h: {"matchName": h}, hostnames),
    st.builds(lambda s: {"matchPattern": s}, st.sampled_from(
        ["*.kadath.io", "**.kadath.io", "**.leng.com", "a*.leng.com", "*", "api.*.io",
         "*.api.kadath.io", "**.a.kadath.io"])),
)
port_entries = st.lists(
    st.fixed_dictionaries({"port": st.sampled_from(["80", "443", "8443"]),
                           "protocol": st.sampled_from(["TCP", "UDP", "ANY"])}),
    min_size=1, max_size=2,
)
egress_rules = st.builds(
    lambda fq, ports, l7: {"toFQDNs": fq, **({"toPorts": [
        {"ports": ports, **({"rules": {"http": [{"method": "GET"}]}} if l7 else {})}
    ]} if ports is not None else {})},
    st.lists(selectors, min_size=1, max_size=3),
    st.none() | port_entries,
    st.booleans(),
)
policies = st.lists(
    st.builds(
        lambda i, egress, labels, deny: cnp(f"p{i}", egress, labels=labels, deny=deny),
        st.integers(0, 99),
        st.lists(egress_rules, min_size=1, max_size=2),
        st.sampled_from([{}, {"app": "cart"}, {"app": "web"}]),
        st.none() | st.lists(st.builds(lambda s: {"toFQDNs": [s]}, selectors), max_size=1),
    ),
    min_size=1, max_size=3, unique_by=lambda p: p["metadata"]["name"],
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies, st.data())
def test_never_allows_what_cilium_denies(source: list[dict[str, Any]], data) -> None:
    """For generated CiliumNetworkPolicies and requests, an imported allow is a Cilium allow."""
    judge = Judge(import_objects("cilium", {"p.yaml": dump(*source)}))
    names = [next(iter(s.values())) for p in source for r in p["spec"]["egress"]
             for s in r["toFQDNs"]]
    requests = data.draw(st.lists(
        st.tuples(near(names), st.sampled_from([80, 443, 8443]), st.sampled_from(["TLS", "HTTP"]),
                  st.sampled_from([{}, {"app": "cart"}, {"app": "web"}])),
        min_size=1, max_size=12))
    for host, port, protocol, labels in requests:
        if judge.allows(host, port, protocol, labels=labels):
            assert cilium_allows(source, labels, host, port, protocol), (host, port, labels)


def test_clusterwide_policies_map_to_the_cluster_tier_or_their_namespace() -> None:
    """A clusterwide policy without a namespace label is the cluster tier; with one, that namespace."""
    everywhere = {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
                  "metadata": {"name": "all"},
                  "spec": {"endpointSelector": {"matchLabels": {"team": "pay"}},
                           "egress": [{"toFQDNs": [{"matchName": "api.kadath.io"}],
                                       "toPorts": [{"ports": [{"port": "443"}]}]}]}}
    one = {**everywhere, "metadata": {"name": "one"},
           "spec": {**everywhere["spec"], "endpointSelector": {"matchLabels": {
               "k8s:io.kubernetes.pod.namespace": "web",
               "io.cilium.k8s.policy.serviceaccount": "hooks"}},
               "egress": [{"toFQDNs": [{"matchName": "hooks.leng.com"}],
                           "toPorts": [{"ports": [{"port": "443"}]}]}]}}
    judge = Judge(import_objects("cilium", {"p.yaml": dump(everywhere, one)}))
    assert judge.allows("api.kadath.io", 443, namespace="anywhere", labels={"team": "pay"})
    assert not judge.allows("api.kadath.io", 443, namespace="anywhere")
    assert judge.allows("hooks.leng.com", 443, namespace="web", account="hooks")
    assert not judge.allows("hooks.leng.com", 443, namespace="web", account="other")
    assert not judge.allows("hooks.leng.com", 443, namespace="shop", account="hooks")
