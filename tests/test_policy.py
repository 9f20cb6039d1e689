"""Policy ConfigMaps -> NamespacePolicy, and errors a person can act on (authz.policy)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml

from authz.model import Mode, Protocol, Tier
from authz.policy import PolicyError, parse_configmap

CLUSTER_NS = "egress-authz"


def configmap(
    body: str,
    *,
    name: str = "egress-policy",
    namespace: str = "shop",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels if labels is not None else {"egress-authz.io/policy": "true"},
        },
        "data": {"policy.yaml": body},
    }


def problems(body: str, **kw: Any) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_configmap(configmap(body, **kw), cluster_namespace=CLUSTER_NS)
    return info.value.problems


FULL = """
mode: audit
rules:
  - name: payments
    workloads:
      serviceAccounts: [cart]
      matchLabels: {function: finance}
      matchExpressions: [{key: tier, operator: In, values: [backend]}]
    hosts: [api.stripe.com, "*.Kadath.io"]
    ports: [443, 8443]
    protocols: [TLS, http]
    http:
      methods: [get, POST]
      paths: ["/v1/"]
    expires: "2027-01-31T00:00:00Z"
    owner: team-payments
"""


class TestValidPolicy:
    def test_every_field_is_read(self) -> None:
        """The documented example parses into canonical values."""
        policy = parse_configmap(configmap(FULL), cluster_namespace=CLUSTER_NS)
        assert policy.mode is Mode.AUDIT and policy.tier is Tier.NAMESPACE
        (rule,) = policy.rules
        assert rule.name == "payments"
        assert rule.hosts == ("api.stripe.com", "*.kadath.io")
        assert rule.ports == {443, 8443}
        assert rule.protocols == {Protocol.TLS, Protocol.HTTP}
        assert rule.workloads.service_accounts == {"cart"}
        assert dict(rule.workloads.match_labels) == {"function": "finance"}
        assert rule.workloads.match_expressions[0].values == {"backend"}
        assert rule.http is not None and rule.http.methods == {"GET", "POST"}
        assert rule.http.paths == ("/v1/",)
        assert rule.expires == dt.datetime(2027, 1, 31, tzinfo=dt.UTC).timestamp()
        assert rule.owner == "team-payments"

    def test_defaults(self) -> None:
        """Omitted fields: enforce, port 443, both protocols, every workload."""
        policy = parse_configmap(
            configmap("rules: [{name: a, hosts: [api.kadath.io]}]"), cluster_namespace=CLUSTER_NS
        )
        assert policy.mode is Mode.ENFORCE
        (rule,) = policy.rules
        assert rule.ports == {443}
        assert rule.protocols == {Protocol.TLS, Protocol.HTTP}
        assert rule.workloads.service_accounts is None and not rule.workloads.uses_labels
        assert rule.http is None and rule.expires is None

    def test_empty_policy_is_valid_and_allows_nothing(self) -> None:
        """An empty policy.yaml is a namespace that opted in with no rules."""
        policy = parse_configmap(configmap(""), cluster_namespace=CLUSTER_NS)
        assert policy.rules == ()

    def test_unquoted_timestamp_and_bare_date(self) -> None:
        """YAML timestamps are read by us, not by YAML, so both spellings work."""
        body = "rules: [{name: a, hosts: [x.io], expires: 2027-01-31}]"
        policy = parse_configmap(configmap(body), cluster_namespace=CLUSTER_NS)
        assert policy.rules[0].expires == dt.datetime(2027, 1, 31, tzinfo=dt.UTC).timestamp()

    def test_cluster_tier(self) -> None:
        """The cluster policy lives in the service namespace and may deny, even '*'."""
        cm = configmap(
            "deny: [evil.com, '*.evil.com']\nrules: [{name: base, hosts: [ntp.org]}]",
            namespace=CLUSTER_NS,
            labels={"egress-authz.io/tier": "cluster"},
        )
        policy = parse_configmap(cm, cluster_namespace=CLUSTER_NS)
        assert policy.tier is Tier.CLUSTER
        assert policy.deny == ("evil.com", "*.evil.com")


class TestErrors:
    def test_example_message_from_the_issue(self) -> None:
        """Errors name the ConfigMap, the rule (index and name), the field and the fix."""
        body = """
rules:
  - name: first
    hosts: [a.io]
  - name: payments
    hosts: [a.io, b.io, "*.*.io"]
"""
        assert problems(body) == [
            'shop/egress-policy rules[1] "payments" hosts[2]: "*.*.io": '
            "'*' may only be the whole leftmost label, as in '*.example.com'"
        ]

    @pytest.mark.parametrize(
        ("body", "expected"),
        [
            ("rules: [{name: a, hosts: ['*']}]", 'rules[0] "a" hosts[0]: "*": a bare \'*\''),
            ("rules: [{name: a, hosts: [x.io], color: red}]", "unknown field 'color'"),
            ("rule: []", "unknown field 'rule'; allowed: mode, rules"),
            ("mode: strict", "mode: 'strict' is not a mode; allowed: enforce, audit"),
            ("rules: [{name: a, hosts: [x.io], ports: [0]}]", "ports[0]: 0 is out of range"),
            ("rules: [{name: a, hosts: [x.io], ports: [65536]}]", "ports[0]: 65536 is out"),
            ("rules: [{name: a, hosts: [x.io], ports: ['443']}]", "is not a port number"),
            ("rules: [{name: a, hosts: [x.io], ports: [true]}]", "is not a port number"),
            ("rules: [{name: a, hosts: [x.io], protocols: [UDP]}]", "'UDP' is not a protocol"),
            ("rules: [{name: a, hosts: x.io}]", "hosts: must be a non-empty list"),
            ("rules: [{name: a}]", 'rules[0] "a" hosts: is required'),
            ("rules: [{hosts: [x.io]}]", "rules[0].name: every rule needs a name"),
            (
                "rules: [{name: a, hosts: [x.io]}, {name: a, hosts: [y.io]}]",
                'rules[1] "a" name: duplicates rules[0]',
            ),
            ("rules: [{name: a, hosts: [x.io], expires: soon}]", "'soon' is not a date"),
            (
                "rules: [{name: a, hosts: [x.io], expires: '2027-01-31T00:00:00'}]",
                "has no time zone",
            ),
            (
                "rules: [{name: a, hosts: [x.io], workloads: {matchLabels: {'bad key!': x}}}]",
                "label key name 'bad key!'",
            ),
            (
                "rules: [{name: a, hosts: [x.io], workloads: {matchLabels: {app: 'a b'}}}]",
                "label value 'a b'",
            ),
            (
                "rules: [{name: a, hosts: [x.io], workloads: {matchLabels: {app: 3}}}]",
                "label value must be a string, not a number",
            ),
            (
                "rules: [{name: a, hosts: [x.io], workloads: {matchExpressions: "
                "[{key: t, operator: Near, values: [x]}]}}]",
                "'Near' is not an operator; allowed: In, NotIn, Exists, DoesNotExist",
            ),
            (
                "rules: [{name: a, hosts: [x.io], workloads: {matchExpressions: "
                "[{key: t, operator: In}]}}]",
                "operator In needs at least one value",
            ),
            (
                "rules: [{name: a, hosts: [x.io], workloads: {matchExpressions: "
                "[{key: t, operator: Exists, values: [x]}]}}]",
                "operator Exists takes no values",
            ),
            (
                "rules: [{name: a, hosts: [x.io], workloads: {serviceAccounts: [Bad_SA]}}]",
                "'Bad_SA' is not a valid service account name",
            ),
            (
                "rules: [{name: a, hosts: [x.io], protocols: [TLS], http: {methods: [GET]}}]",
                "protocols excludes HTTP",
            ),
            (
                "rules: [{name: a, hosts: [x.io], http: {paths: [v1]}}]",
                "'v1' must start with '/'",
            ),
            (
                "rules: [{name: a, hosts: [x.io], http: {paths: ['/v1/../admin']}}]",
                "dot segments",
            ),
            (
                "rules: [{name: a, hosts: [x.io], http: {exactPaths: [v1]}}]",
                "http.exactPaths[0]: 'v1' must start with '/' (an exact path)",
            ),
            (
                "rules: [{name: a, hosts: [x.io], http: {exactPaths: ['/a%2f']}}]",
                "an exact path holds no query, fragment, escapes or dot segments",
            ),
            ("rules: [{name: 'a b', hosts: [x.io]}]", "rules[0].name: invalid name 'a b'"),
            ("deny: [x.io]", "'deny' is only allowed in the cluster policy"),
            ("rules: {a: 1}", "rules: must be a list, not a map"),
            ("- a\n- b", "policy.yaml: must be a map, not a list"),
            ("rules: [\n  {name: a, hosts: [x.io]\n", "bad YAML at line"),
            ("mode: enforce\nmode: audit", "key 'mode' is given twice"),
        ],
    )
    def test_each_mistake_is_located_and_explained(self, body: str, expected: str) -> None:
        """Every kind of mistake is an error with its location, never ignored."""
        found = problems(body)
        assert any(expected in p for p in found), found
        assert all(p.startswith("shop/egress-policy") for p in found)

    def test_a_non_string_in_a_list_does_not_shift_later_locations(self) -> None:
        """`paths: ["/a", 3, "/b/../c"]`: the 3 is paths[1]; no error names "/b/../c" as
        paths[1] (dropping the 3 used to shift every later index by one)."""
        body = "rules: [{name: a, hosts: [x.io], http: {paths: ['/a', 3, '/b/../c']}}]"
        found = problems(body)
        assert any("paths[1]: must be a string, not" in p for p in found), found
        assert not any("paths[1]" in p and "/b/../c" in p for p in found), found

    def test_all_problems_are_reported_at_once(self) -> None:
        """A ConfigMap with several mistakes lists them all, not just the first."""
        body = "rules: [{name: a, hosts: ['*'], ports: [0], protocols: [UDP]}]"
        assert len(problems(body)) == 3

    def test_missing_data_key(self) -> None:
        """A policy ConfigMap without policy.yaml says which keys it has."""
        cm = configmap("")
        cm["data"] = {"policy.yml": "rules: []"}
        with pytest.raises(
            PolicyError, match=r"no data key 'policy.yaml' \(keys present: policy.yml"
        ):
            parse_configmap(cm, cluster_namespace=CLUSTER_NS)

    def test_cluster_tier_outside_service_namespace(self) -> None:
        """A namespace cannot make itself the cluster tier."""
        cm = configmap("deny: [x.io]", namespace="shop", labels={"egress-authz.io/tier": "cluster"})
        with pytest.raises(PolicyError, match="only from the service's namespace"):
            parse_configmap(cm, cluster_namespace=CLUSTER_NS)

    def test_rule_with_bare_star_is_refused_even_in_cluster_tier(self) -> None:
        """Only the cluster deny list may say '*': an allow-everything rule is never valid."""
        cm = configmap(
            "rules: [{name: all, hosts: ['*']}]",
            namespace=CLUSTER_NS,
            labels={"egress-authz.io/tier": "cluster"},
        )
        with pytest.raises(PolicyError, match="bare"):
            parse_configmap(cm, cluster_namespace=CLUSTER_NS)

    def test_round_trip_through_yaml_dump(self) -> None:
        """A ConfigMap as `kubectl get -o yaml` prints it parses the same."""
        cm = yaml.safe_load(yaml.safe_dump(configmap(FULL)))
        assert parse_configmap(cm, cluster_namespace=CLUSTER_NS).rules[0].name == "payments"
