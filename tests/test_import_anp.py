"""`egress-authz import --from k8s-anp`: AdminNetworkPolicy domainNames, order, subjects."""

from __future__ import annotations

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

NAMESPACES = {"shop": {"team": "a"}, "web": {"team": "b"}}

# --------------------------------------------------------------------------
# ANP's documented matching (network-policy-api, v1alpha1 DomainName):
# `kubernetes.io` only that name; `*.kubernetes.io` one or more labels below
# it, never the apex. Rules by priority (lower first), then as written; the
# first match decides. Model, strictest reading: rules of one priority in
# different policies are unordered, so any Deny/Pass among them wins; a
# `networks` peer may hold any name's address; no match is not an allow.


def anp_name_matches(domain: str, name: str) -> bool:
    d = domain.lower().rstrip(".")
    return name.endswith(d[1:]) if d.startswith("*.") else name == d


def _selector_ok(sel: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (sel or {}).get("matchLabels", {}).items())


def anp_allows(policies: list[dict[str, Any]], ns: str, pod: dict[str, str], host: str,
               port: int) -> bool:
    ns_labels = {**NAMESPACES.get(ns, {}), "kubernetes.io/metadata.name": ns}
    by_priority: dict[int, list[str]] = {}
    for p in policies:
        subject = p["spec"]["subject"]
        if "pods" in subject:
            applies = _selector_ok(subject["pods"]["namespaceSelector"], ns_labels) and \
                _selector_ok(subject["pods"]["podSelector"], pod)
        else:
            applies = _selector_ok(subject["namespaces"], ns_labels)
        if not applies:
            continue
        for rule in p["spec"]["egress"]:
            if "ports" in rule and not any(
                q["portNumber"]["port"] == port for q in rule["ports"]
            ):
                continue
            if any("networks" in peer or any(anp_name_matches(d, host)
                                             for d in peer.get("domainNames", []))
                   for peer in rule["to"]):
                by_priority.setdefault(p["spec"]["priority"], []).append(rule["action"])
                break  # the first matching rule of this policy decides for it
    for priority in sorted(by_priority):
        actions = by_priority[priority]
        return all(a == "Allow" for a in actions)
    return False


def anp(name: str, priority: int, subject: dict[str, Any], egress: list[dict[str, Any]]):
    return {"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": name},
            "spec": {"priority": priority, "subject": subject, "egress": egress}}


def namespace_objects() -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": n, "labels": labels}} for n, labels in NAMESPACES.items()]


class TestDocumented:
    def test_domain_names_match_as_documented(self) -> None:
        """The API's examples: exact names, and `*.` one or more labels without the apex."""
        assert anp_name_matches("kubernetes.io", "kubernetes.io")
        assert not anp_name_matches("kubernetes.io", "www.kubernetes.io")
        assert anp_name_matches("*.kubernetes.io", "latest.blog.kubernetes.io")
        assert not anp_name_matches("*.kubernetes.io", "kubernetes.io")
        policy = anp("allow-k8s", 10, {"namespaces": {}}, [
            {"name": "docs", "action": "Allow",
             "to": [{"domainNames": ["kubernetes.io", "*.kubernetes.io"]}],
             "ports": [{"portNumber": {"protocol": "TCP", "port": 443}}]},
            {"name": "rest", "action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]},
        ])
        result = import_objects("k8s-anp", {"anp.yaml": dump(policy)})
        assert outcome_of(result, '"*.kubernetes.io"') == "exact"
        assert outcome_of(result, "to[0] networks") == "not-translatable"
        judge = Judge(result)
        # An empty namespace selector is every namespace: the cluster tier.
        for ns in ("shop", "anything"):
            assert judge.allows("blog.kubernetes.io", 443, namespace=ns)
            assert judge.allows("kubernetes.io", 443, namespace=ns)
            assert not judge.allows("kubernetes.io", 80, namespace=ns)

    def test_an_earlier_deny_or_pass_takes_its_overlap_away(self) -> None:
        """A Deny to networks before an Allow kills it; a Pass on a name drops the overlap."""
        first = anp("first", 5, {"namespaces": {}}, [
            {"action": "Pass", "to": [{"domainNames": ["*.kadath.io"]}]}])
        second = anp("second", 10, {"namespaces": {}}, [
            {"action": "Allow", "to": [{"domainNames": ["api.kadath.io", "api.leng.com"]}]}])
        judge = Judge(import_objects("k8s-anp", {"a.yaml": dump(first, second)}))
        assert not judge.allows("api.kadath.io", 443) and judge.allows("api.leng.com", 443)
        blocker = anp("blocker", 1, {"namespaces": {}}, [
            {"action": "Deny", "to": [{"networks": ["10.0.0.0/8"]}]}])
        result = import_objects("k8s-anp", {"a.yaml": dump(blocker, second)})
        assert outcome_of(result, '"api.leng.com"') == "not-translatable"

    def test_namespace_selectors(self, tmp_path, capsys) -> None:
        """By name: that namespace; by label: the Namespace objects given; else reported."""
        by_name = anp("by-name", 1, {"pods": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
            "podSelector": {"matchLabels": {"app": "cart"}}}},
            [{"action": "Allow", "to": [{"domainNames": ["api.kadath.io"]}]}])
        by_label = anp("by-label", 2, {"namespaces": {"matchLabels": {"team": "b"}}},
                       [{"action": "Allow", "to": [{"domainNames": ["api.leng.com"]}]}])
        without = import_objects("k8s-anp", {"a.yaml": dump(by_name, by_label)})
        assert outcome_of(without, '"api.leng.com"') == "not-translatable"
        result = import_objects("k8s-anp", {"a.yaml": dump(by_name, by_label,
                                                           *namespace_objects())})
        assert outcome_of(result, '"api.leng.com"') == "narrower"
        judge = Judge(result)
        assert judge.allows("api.kadath.io", 443, labels={"app": "cart"})
        assert not judge.allows("api.kadath.io", 443, labels={"app": "web"})
        assert not judge.allows("api.kadath.io", 443, namespace="web", labels={"app": "cart"})
        assert judge.allows("api.leng.com", 443, namespace="web")
        assert not judge.allows("api.leng.com", 443, namespace="shop")
        lint_output(result, tmp_path, capsys)

    def test_deny_domain_names_go_to_the_cluster_deny(self) -> None:
        """A Deny on domainNames is the cluster tier's deny, over every namespace's allow."""
        deny = anp("deny", 1, {"namespaces": {}},
                   [{"action": "Deny", "to": [{"domainNames": ["*.stealyourmoney.com"]}]}])
        allow = anp("allow", 9, {"namespaces": {}},
                    [{"action": "Allow", "to": [{"domainNames": ["api.kadath.io"]}]}])
        judge = Judge(import_objects("k8s-anp", {"a.yaml": dump(deny, allow)}))
        assert judge.allows("api.kadath.io", 443)
        assert not judge.allows("x.stealyourmoney.com", 443)


subjects = st.sampled_from([
    {"namespaces": {}},
    {"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}}},
    {"namespaces": {"matchLabels": {"team": "b"}}},
    {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "cart"}}}},
])
domains = st.one_of(hostnames, hostnames.map(lambda h: "*." + h))
peers = st.one_of(
    st.builds(lambda d: {"domainNames": d}, st.lists(domains, min_size=1, max_size=3)),
    st.just({"networks": ["0.0.0.0/0"]}),
    st.just({"namespaces": {}}),
)
egress = st.builds(
    lambda action, to, ps: {"action": action, "to": to, **({"ports": [
        {"portNumber": {"protocol": "TCP", "port": p}} for p in ps]} if ps else {})},
    st.sampled_from(["Allow", "Allow", "Deny", "Pass"]),
    st.lists(peers, min_size=1, max_size=2),
    st.none() | st.lists(st.sampled_from([80, 443, 8443]), min_size=1, max_size=2, unique=True),
)
policies = st.lists(
    st.builds(lambda i, prio, subj, eg: anp(f"p{i}", prio, subj, eg),
              st.integers(0, 99), st.integers(1, 3), subjects,
              st.lists(egress, min_size=1, max_size=3)),
    min_size=1, max_size=3, unique_by=lambda p: p["metadata"]["name"],
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies, st.data())
def test_never_allows_what_anp_denies(source, data) -> None:
    """For generated AdminNetworkPolicies and requests, an imported allow is an ANP allow."""
    judge = Judge(import_objects("k8s-anp", {"a.yaml": dump(*source, *namespace_objects())}))
    names = [d for p in source for r in p["spec"]["egress"] for peer in r["to"]
             for d in peer.get("domainNames", [])]
    requests = data.draw(st.lists(st.tuples(near(names), st.sampled_from([80, 443, 8443]),
                                            st.sampled_from(["shop", "web"]),
                                            st.sampled_from([{}, {"app": "cart"}])),
                                  min_size=1, max_size=12))
    for host, port, ns, labels in requests:
        for protocol in ("TLS", "HTTP"):
            if judge.allows(host, port, protocol, namespace=ns, labels=labels):
                assert anp_allows(source, ns, labels, host, port), (ns, labels, host, port)


def test_baseline_allows_are_not_carried_over() -> None:
    """A BaselineAdminNetworkPolicy allow comes after NetworkPolicy: reported, not written."""
    banp = {"apiVersion": "policy.networking.k8s.io/v1alpha1",
            "kind": "BaselineAdminNetworkPolicy", "metadata": {"name": "default"},
            "spec": {"subject": {"namespaces": {}}, "egress": [
                {"action": "Allow", "to": [{"domainNames": ["api.kadath.io"]}]}]}}
    result = import_objects("k8s-anp", {"b.yaml": dump(banp)})
    assert outcome_of(result, '"api.kadath.io"') == "not-translatable"
    assert not result.configmaps
