"""`egress-authz import --from gke | aws-nfw | serviceentry`: documented examples, never wider."""

from __future__ import annotations

import json
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
    ports,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def requests(names: list[str]) -> st.SearchStrategy[list[tuple[str, int, str, str]]]:
    return st.lists(
        st.tuples(near(names), ports, st.sampled_from(["TLS", "HTTP"]),
                  st.sampled_from(["shop", "web"])),
        min_size=1,
        max_size=12,
    )

# --------------------------------------------------------------------------
# GKE FQDNNetworkPolicy. The documentation's rule: `name` is exact; in
# `pattern`, `*.company.com` matches api.company.com and store.company.com,
# not eu.api.company.com nor company.com (one label).


def gke_matches(match: dict[str, str], name: str) -> bool:
    if "name" in match:
        return name == match["name"].lower().rstrip(".")
    regex = "".join("[-a-z0-9]*" if c == "*" else re.escape(c) for c in match["pattern"].lower())
    return re.fullmatch(regex, name) is not None


def gke_allows(policies: list[dict[str, Any]], labels: dict[str, str], host: str, port: int) -> bool:
    for p in policies:
        wanted = p["spec"]["podSelector"].get("matchLabels", {})
        if any(labels.get(k) != v for k, v in wanted.items()):
            continue
        for rule in p["spec"]["egress"]:
            port_ok = "ports" not in rule or any(
                q.get("protocol", "TCP") == "TCP" and q["port"] == port for q in rule["ports"]
            )
            if port_ok and any(gke_matches(m, host) for m in rule["matches"]):
                return True
    return False


def fqdnnp(name: str, egress: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "networking.gke.io/v1alpha1", "kind": "FQDNNetworkPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": labels}, "egress": egress}}


class TestGke:
    def test_documented_pattern_example(self) -> None:
        """`*.company.com` is one label in GKE: the model agrees, and the import refuses it."""
        star = {"pattern": "*.company.com"}
        assert gke_matches(star, "api.company.com") and gke_matches(star, "store.company.com")
        assert not gke_matches(star, "eu.api.company.com") and not gke_matches(star, "company.com")
        policy = fqdnnp("allow-out-fqdnnp", [{
            "matches": [{"pattern": "*.company.com"}, {"name": "www.google.com"}],
            "ports": [{"protocol": "TCP", "port": 443}],
        }], {"app": "curl-client"})
        result = import_objects("gke", {"p.yaml": dump(policy)})
        assert outcome_of(result, '"*.company.com"') == "not-translatable"
        assert outcome_of(result, '"www.google.com"') == "exact"
        judge = Judge(result)
        assert judge.allows("www.google.com", 443, labels={"app": "curl-client"})
        assert not judge.allows("api.company.com", 443, labels={"app": "curl-client"})
        assert not judge.allows("www.google.com", 443, labels={"app": "other"})

    def test_open_source_controller_schema(self, tmp_path, capsys) -> None:
        """The v1alpha3 `to[].fqdns` schema carries exact names; the output passes lint."""
        policy = {"apiVersion": "networking.gke.io/v1alpha3", "kind": "FQDNNetworkPolicy",
                  "metadata": {"name": "example", "namespace": "shop"},
                  "spec": {"podSelector": {"matchLabels": {"role": "example"}},
                           "egress": [{"to": [{"fqdns": ["example.com"]}],
                                       "ports": [{"port": 443, "protocol": "TCP"}]}]}}
        result = import_objects("gke", {"p.yaml": dump(policy)})
        assert outcome_of(result, '"example.com"') == "exact"
        lint_output(result, tmp_path, capsys)


gke_matches_st = st.one_of(
    st.builds(lambda h: {"name": h}, hostnames),
    st.builds(lambda h: {"pattern": h}, hostnames),
    st.sampled_from([{"pattern": "*.kadath.io"}, {"pattern": "a*.leng.com"}, {"pattern": "*"}]),
)
gke_policies = st.lists(
    st.builds(
        lambda i, egress, labels: fqdnnp(f"p{i}", egress, labels),
        st.integers(0, 99),
        st.lists(st.builds(
            lambda m, p: {"matches": m, **({"ports": p} if p is not None else {})},
            st.lists(gke_matches_st, min_size=1, max_size=3),
            st.none() | st.lists(st.fixed_dictionaries({
                "port": st.sampled_from([80, 443, 8443]),
                "protocol": st.sampled_from(["TCP", "UDP"])}), min_size=1, max_size=2),
        ), min_size=1, max_size=2),
        st.sampled_from([{}, {"app": "cart"}]),
    ),
    min_size=1, max_size=3, unique_by=lambda p: p["metadata"]["name"],
)


@SETTINGS
@given(gke_policies, st.data(), st.sampled_from([{}, {"app": "cart"}, {"app": "web"}]))
def test_never_allows_what_gke_denies(source, data, labels) -> None:
    """For generated FQDNNetworkPolicies and requests, an imported allow is a GKE allow."""
    judge = Judge(import_objects("gke", {"p.yaml": dump(*source)}))
    names = [v for p in source for r in p["spec"]["egress"] for m in r["matches"]
             for v in m.values()]
    for host, port, protocol, _ in data.draw(requests(names)):
        if judge.allows(host, port, protocol, labels=labels):
            assert gke_allows(source, labels, host, port), (host, port, labels)


# --------------------------------------------------------------------------
# AWS Network Firewall domain lists. Documented: `abc.example.com` only that
# name; `.example.com` example.com and all its subdomains. TLS_SNI inspects
# TLS, HTTP_HOST HTTP. Model, strictest reading of rule order: allowed when an
# ALLOWLIST for the protocol names it and no DENYLIST for the protocol does.


def aws_matches(target: str, name: str) -> bool:
    t = target.lower()
    return name == t[1:] or name.endswith(t) if t.startswith(".") else name == t


def aws_allows(groups: list[dict[str, Any]], host: str, protocol: str) -> bool:
    kind = "TLS_SNI" if protocol == "TLS" else "HTTP_HOST"
    relevant = [g for g in groups if kind in g["TargetTypes"]]
    listed = lambda k: any(  # noqa: E731
        aws_matches(t, host) for g in relevant if g["GeneratedRulesType"] == k
        for t in g["Targets"]
    )
    return listed("ALLOWLIST") and not listed("DENYLIST")


def rule_group(name: str, rsl: dict[str, Any]) -> str:
    return json.dumps({"RuleGroup": {"RulesSource": {"RulesSourceList": rsl}},
                       "RuleGroupResponse": {"RuleGroupName": name}})


class TestAws:
    def test_documented_targets(self, tmp_path, capsys) -> None:
        """`.example.com` covers the apex and subdomains; explicit names only themselves."""
        assert aws_matches(".example.com", "example.com")
        assert aws_matches(".example.com", "abc.example.com")
        assert not aws_matches("abc.example.com", "www.example.com")
        allow = {"GeneratedRulesType": "ALLOWLIST", "Targets": [".example.com", "abc.kadath.io"],
                 "TargetTypes": ["TLS_SNI"]}
        result = import_objects("aws-nfw", {"a.json": rule_group("egress", allow)},
                                namespace="shop")
        judge = Judge(result)
        assert judge.allows("example.com", 443) and judge.allows("www.example.com", 443)
        assert judge.allows("abc.kadath.io", 443) and not judge.allows("www.kadath.io", 443)
        assert not judge.allows("example.com", 80, "HTTP")  # HTTP_HOST was not listed
        # AWS inspects any port; we write 443: narrower, and said so.
        assert outcome_of(result, '".example.com"') == "narrower"
        lint_output(result, tmp_path, capsys)

    def test_denylist_goes_to_the_cluster_tier(self) -> None:
        """DENYLIST targets become the cluster `deny`, which beats the allow list."""
        allow = {"GeneratedRulesType": "ALLOWLIST", "Targets": [".kadath.io"],
                 "TargetTypes": ["TLS_SNI", "HTTP_HOST"]}
        deny = {"GeneratedRulesType": "DENYLIST", "Targets": ["secret.kadath.io"],
                "TargetTypes": ["HTTP_HOST"]}
        result = import_objects("aws-nfw", {"a.json": rule_group("allow", allow),
                                            "d.json": rule_group("deny", deny)})
        cluster = [cm for cm in result.configmaps
                   if cm["metadata"]["labels"].get("egress-authz.io/tier") == "cluster"]
        assert {cm["metadata"]["namespace"] for cm in cluster} == {"egress-authz"}
        judge = Judge(result)
        assert judge.allows("api.kadath.io", 443, namespace="any")
        assert not judge.allows("secret.kadath.io", 443, namespace="any")

    def test_public_suffix_targets_are_not_translated(self) -> None:
        """`.com` would be `*.com`: reported not translatable, nothing under com allowed."""
        allow = {"GeneratedRulesType": "ALLOWLIST", "Targets": [".com"], "TargetTypes": ["TLS_SNI"]}
        result = import_objects("aws-nfw", {"a.json": rule_group("g", allow)}, namespace="shop")
        assert outcome_of(result, '".com"') == "not-translatable"
        assert not result.configmaps


aws_groups = st.lists(
    st.fixed_dictionaries({
        "GeneratedRulesType": st.sampled_from(["ALLOWLIST", "DENYLIST"]),
        "Targets": st.lists(st.one_of(hostnames, hostnames.map(lambda h: "." + h)),
                            min_size=1, max_size=3),
        "TargetTypes": st.lists(st.sampled_from(["TLS_SNI", "HTTP_HOST"]), min_size=1,
                                max_size=2, unique=True),
    }),
    min_size=1, max_size=3,
)


@SETTINGS
@given(aws_groups, st.data(), st.sampled_from([None, "shop"]))
def test_never_allows_what_aws_denies(groups, data, namespace) -> None:
    """For generated domain lists and requests, an imported allow is an AWS allow."""
    files = {f"g{i}.json": rule_group(f"g{i}", g) for i, g in enumerate(groups)}
    judge = Judge(import_objects("aws-nfw", files, namespace=namespace))
    names = [t for g in groups for t in g["Targets"]]
    for host, port, protocol, ns in data.draw(requests(names)):
        if judge.allows(host, port, protocol, namespace=ns):
            assert aws_allows(groups, host, protocol), (host, protocol)
            assert namespace in (None, ns)


# --------------------------------------------------------------------------
# ServiceEntries. Istio's `hosts`: a name or `*.` prefix (any depth, not the
# apex). Reachable from a namespace when exported to it (no exportTo: every
# namespace, Istio's default) on a listed port of a matching protocol.

HTTP_FAMILY = ("HTTP", "HTTP2", "GRPC")


def istio_host_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def istio_allows(entries: list[dict[str, Any]], ns: str, host: str, port: int, proto: str) -> bool:
    for se in entries:
        export = se["spec"].get("exportTo", ["*"])
        own = se["metadata"]["namespace"]
        if not ("*" in export or ns in export or ("." in export and ns == own)):
            continue
        if not any(istio_host_matches(h, host) for h in se["spec"]["hosts"]):
            continue
        for p in se["spec"]["ports"]:
            family = "HTTP" if p["protocol"] in HTTP_FAMILY else "TLS"
            if p["number"] == port and (family == proto or p["protocol"] == "TCP"):
                return True
    return False


def service_entry(name: str, ns: str, hosts: list[str], ports_: list[dict[str, Any]],
                  export: list[str] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"hosts": hosts, "ports": ports_, "location": "MESH_EXTERNAL",
                            "resolution": "DNS"}
    if export is not None:
        spec["exportTo"] = export
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


class TestServiceEntry:
    def test_hosts_ports_and_export(self, tmp_path, capsys) -> None:
        """Hosts carry over exactly; exportTo picks the namespaces; TLS and HTTP ports split."""
        se = service_entry("kadath", "shop", ["api.kadath.io", "*.leng.com"],
                           [{"number": 443, "name": "tls", "protocol": "TLS"},
                            {"number": 80, "name": "http", "protocol": "HTTP"}], ["."])
        everyone = service_entry("wide", "shop", ["hooks.kadath.io"],
                                 [{"number": 443, "name": "https", "protocol": "HTTPS"}], ["*"])
        mine = service_entry("mine", "web", ["sole.kadath.io"],
                             [{"number": 443, "name": "https", "protocol": "HTTPS"}], None)
        result = import_objects("serviceentry", {"se.yaml": dump(se, everyone, mine)})
        assert outcome_of(result, '"api.kadath.io"') == "exact"
        assert outcome_of(result, '"sole.kadath.io"') == "narrower"  # no exportTo
        judge = Judge(result)
        assert judge.allows("a.b.leng.com", 443) and not judge.allows("leng.com", 443)
        assert judge.allows("api.kadath.io", 80, "HTTP") and not judge.allows("api.kadath.io", 80)
        assert not judge.allows("api.kadath.io", 443, namespace="web")
        assert judge.allows("hooks.kadath.io", 443, namespace="web")
        assert judge.allows("sole.kadath.io", 443, namespace="web")
        assert not judge.allows("sole.kadath.io", 443, namespace="shop")
        lint_output(result, tmp_path, capsys)

    def test_entries_we_wrote_and_internal_ones_are_skipped(self) -> None:
        """Our own rendered ServiceEntries and MESH_INTERNAL entries are not imported."""
        ours = service_entry("x", "shop", ["api.kadath.io"],
                             [{"number": 443, "name": "t", "protocol": "TLS"}], None)
        ours["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "egress-authz"}
        internal = service_entry("y", "shop", ["db.internal.example"],
                                 [{"number": 5432, "name": "t", "protocol": "TCP"}], None)
        internal["spec"]["location"] = "MESH_INTERNAL"
        result = import_objects("serviceentry", {"se.yaml": dump(ours, internal)})
        assert not result.configmaps
        assert {n.outcome.value for n in result.notes} == {"not-translatable"}


se_hosts = st.one_of(hostnames, hostnames.map(lambda h: "*." + h))
entries = st.lists(
    st.builds(
        lambda i, ns, hosts, ps, export: service_entry(f"se{i}", ns, hosts, ps, export),
        st.integers(0, 99),
        st.sampled_from(["shop", "web"]),
        st.lists(se_hosts, min_size=1, max_size=3),
        st.lists(st.builds(lambda n, p: {"number": n, "name": f"p{n}", "protocol": p}, ports,
                           st.sampled_from(["HTTP", "HTTPS", "TLS", "TCP", "GRPC"])),
                 min_size=1, max_size=2, unique_by=lambda p: p["number"]),
        st.none() | st.lists(st.sampled_from([".", "*", "shop", "web", "~"]), min_size=1,
                             max_size=2),
    ),
    min_size=1, max_size=3, unique_by=lambda s: s["metadata"]["name"],
)


@SETTINGS
@given(entries, st.data())
def test_never_allows_what_istio_would_not_route(source, data) -> None:
    """For generated ServiceEntries and requests, an imported allow is reachable in Istio."""
    judge = Judge(import_objects("serviceentry", {"se.yaml": dump(*source)}))
    names = [h for se in source for h in se["spec"]["hosts"]]
    for host, port, protocol, ns in data.draw(requests(names)):
        if judge.allows(host, port, protocol, namespace=ns):
            assert istio_allows(source, ns, host, port, protocol), (ns, host, port, protocol)


class TestStricterParser:
    """The importer follows whatever the policy parser refuses (e.g. public-suffix wildcards)."""

    def test_refused_allow_and_refused_deny(self, monkeypatch) -> None:
        """A refused allow is reported; a refused deny removes the allows it overlaps."""
        from authz import hosts

        real = hosts.parse_pattern

        def stricter(raw, *, allow_any=False):
            if isinstance(raw, str) and raw.lower() == "*.co.uk":
                raise hosts.PatternError("'*.co.uk' is a wildcard over a public suffix")
            return real(raw, allow_any=allow_any)

        monkeypatch.setattr(hosts, "parse_pattern", stricter)
        allow = {"GeneratedRulesType": "ALLOWLIST", "TargetTypes": ["TLS_SNI"],
                 "Targets": [".co.uk", "api.kadath.co.uk", "api.leng.com"]}
        deny = {"GeneratedRulesType": "DENYLIST", "TargetTypes": ["TLS_SNI"],
                "Targets": [".co.uk"]}
        result = import_objects("aws-nfw", {"a.json": rule_group("a", allow),
                                            "d.json": rule_group("d", deny)}, namespace="shop")
        assert outcome_of(result, 'ALLOWLIST ".co.uk"') == "not-translatable"
        assert outcome_of(result, 'ALLOWLIST "api.kadath.co.uk"') == "not-translatable"
        assert outcome_of(result, 'ALLOWLIST "api.leng.com"') == "narrower"
        judge = Judge(result)
        assert judge.allows("api.leng.com", 443)
        assert not judge.allows("api.kadath.co.uk", 443)
