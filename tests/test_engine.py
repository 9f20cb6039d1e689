"""The decision engine (authz.engine): semantics, reasons, audit mode, explanations."""

from __future__ import annotations

import time
from types import MappingProxyType
from typing import Any

import pytest

from authz.engine import clean_path, compile_policy, decide, new_decision_id, parse_principal
from authz.loader import build_policy_set
from authz.model import Destination, Identity, Protocol, Reason, Verdict, Workload
from authz.policy import parse_configmap

CLUSTER_NS = "egress-authz"


def cm(
    namespace: str, body: str, *, name: str = "egress-policy", cluster: bool = False
) -> dict[str, Any]:
    labels = {"egress-authz.io/tier": "cluster"} if cluster else {"egress-authz.io/policy": "true"}
    return {
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {"policy.yaml": body},
    }


def snapshot(*configmaps: dict[str, Any], revision: int = 7):
    policies = [parse_configmap(c, cluster_namespace=CLUSTER_NS) for c in configmaps]
    return compile_policy(build_policy_set(policies, revision=revision))


def who(
    ns: str = "shop", sa: str = "cart", labels: dict[str, str] | None = None, *, pod: bool = True
) -> Identity:
    workload = Workload(ns, sa, MappingProxyType(labels or {}), f"{sa}-pod", "10.0.0.9")
    return Identity(
        f"spiffe://cluster.local/ns/{ns}/sa/{sa}", "10.0.0.9", workload if pod else None
    )


def tls(host: str, port: int = 443) -> Destination:
    return Destination(port, Protocol.TLS, sni=host)


def http(
    host: str, method: str = "GET", path: str = "/", port: int = 80, sni: str | None = None
) -> Destination:
    return Destination(port, Protocol.HTTP, sni=sni, http_host=host, method=method, path=path)


SHOP = cm(
    "shop",
    """
rules:
  - name: kadath
    workloads: {matchLabels: {function: api-connector}}
    hosts: [api.kadath.io, "*.leng.com"]
    owner: team-a
  - name: finance
    workloads:
      serviceAccounts: [cart]
      matchExpressions: [{key: function, operator: In, values: [finance]}]
    hosts: [api.leng.com]
  - name: web
    hosts: [web.example.com]
    ports: [80, 443]
    protocols: [HTTP]
    http: {methods: [GET], paths: ["/v1/"]}
""",
)


class TestAllow:
    def test_exact_host_for_selected_workload(self) -> None:
        """A rule naming the host, for a workload its selector picks, allows."""
        d = decide(snapshot(SHOP), who(labels={"function": "api-connector"}), tls("api.kadath.io"))
        assert (d.allowed, d.verdict, d.reason) == (True, Verdict.ALLOW, Reason.ALLOWED)
        assert d.rule == "shop/egress-policy/kadath" and d.owner == "team-a"
        assert d.revision == 7 and d.namespace == "shop" and d.service_account == "cart"
        assert d.explanation == ()  # allows never pay for explanations

    def test_wildcard_any_depth_not_apex(self) -> None:
        """'*.leng.com' allows names below leng.com at any depth, never leng.com."""
        s = snapshot(SHOP)
        ident = who(labels={"function": "api-connector"})
        assert decide(s, ident, tls("x.leng.com")).allowed
        assert decide(s, ident, tls("a.b.c.leng.com")).allowed
        assert decide(s, ident, tls("leng.com")).reason is Reason.HOST_NOT_ALLOWED
        assert decide(s, ident, tls("evilleng.com")).reason is Reason.HOST_NOT_ALLOWED

    def test_host_normalised_before_matching(self) -> None:
        """Case, trailing dot and a Host port do not change the decision."""
        s = snapshot(SHOP)
        ident = who(labels={"function": "api-connector"})
        assert decide(s, ident, tls("API.KADATH.IO.")).allowed
        assert decide(s, ident, http("Api.Kadath.Io:443", port=443)).allowed

    def test_cluster_rules_apply_to_every_namespace(self) -> None:
        """A cluster rule is a baseline for namespaces with or without their own policy."""
        cluster = cm(
            CLUSTER_NS,
            "rules: [{name: ntp, hosts: [time.cloudflare.com]}]",
            cluster=True,
            name="cluster",
        )
        s = snapshot(SHOP, cluster)
        assert decide(s, who(), tls("time.cloudflare.com")).rule == "egress-authz/cluster/ntp"
        assert decide(s, who("other", "x"), tls("time.cloudflare.com")).allowed

    def test_several_configmaps_in_a_namespace_add_up(self) -> None:
        """Two policy ConfigMaps of one namespace are both in force."""
        second = cm("shop", "rules: [{name: extra, hosts: [extra.io]}]", name="more")
        s = snapshot(SHOP, second)
        assert decide(s, who(), tls("extra.io")).rule == "shop/more/extra"


class TestDeny:
    def test_default_deny_without_policy(self) -> None:
        """A namespace with no policy reaches nothing: reason no-policy."""
        d = decide(snapshot(SHOP), who("billing", "api"), tls("api.kadath.io"))
        assert (d.allowed, d.reason) == (False, Reason.NO_POLICY)
        assert d.policy_source == "billing/<new policy ConfigMap>"

    def test_host_not_allowed(self) -> None:
        """A host no rule names is denied, with the ConfigMap to edit."""
        d = decide(snapshot(SHOP), who(), tls("api.stealyourmoney.com"))
        assert d.reason is Reason.HOST_NOT_ALLOWED and d.policy_source == "shop/egress-policy"

    def test_label_selection(self) -> None:
        """Same service account, different labels, different verdicts."""
        s = snapshot(SHOP)
        assert decide(s, who(labels={"function": "finance"}), tls("api.leng.com")).allowed
        d = decide(s, who(labels={"function": "other"}), tls("api.leng.com"))
        assert d.reason is Reason.HOST_NOT_ALLOWED

    @pytest.mark.parametrize(
        ("labels", "op", "values", "expected"),
        [
            ({"t": "a"}, "In", "[a, b]", True),
            ({"t": "c"}, "In", "[a, b]", False),
            ({}, "In", "[a]", False),
            ({"t": "c"}, "NotIn", "[a]", True),
            ({"t": "a"}, "NotIn", "[a]", False),
            ({}, "NotIn", "[a]", True),
            ({"t": ""}, "Exists", None, True),
            ({}, "Exists", None, False),
            ({}, "DoesNotExist", None, True),
            ({"t": "x"}, "DoesNotExist", None, False),
        ],
    )
    def test_match_expressions(
        self, labels: dict[str, str], op: str, values: str | None, expected: bool
    ) -> None:
        """Kubernetes label-selector semantics for each operator."""
        vals = f", values: {values}" if values else ""
        body = (
            f"rules: [{{name: r, hosts: [x.io], workloads: {{matchExpressions: "
            f"[{{key: t, operator: {op}{vals}}}]}}}}]"
        )
        assert (
            decide(snapshot(cm("shop", body)), who(labels=labels), tls("x.io")).allowed is expected
        )

    def test_label_rules_need_a_known_pod(self) -> None:
        """With no Pod known for the source IP, label rules never apply (fail closed),
        even NotIn ones that empty labels would satisfy; account-only rules still do."""
        body = """
rules:
  - {name: notin, hosts: [a.io], workloads: {matchExpressions: [{key: t, operator: NotIn, values: [x]}]}}
  - {name: sa, hosts: [b.io], workloads: {serviceAccounts: [cart]}}
"""
        s = snapshot(cm("shop", body))
        d = decide(s, who(pod=False), tls("a.io"))
        assert not d.allowed and "no Pod is known" in d.explanation[0].why
        assert decide(s, who(pod=False), tls("b.io")).allowed

    def test_service_account_selection(self) -> None:
        """serviceAccounts limits a rule to those accounts."""
        s = snapshot(SHOP)
        d = decide(s, who("shop", "frontend", {"function": "finance"}), tls("api.leng.com"))
        assert d.reason is Reason.HOST_NOT_ALLOWED
        assert "service account frontend is not in serviceAccounts [cart]" in d.explanation[0].why

    @pytest.mark.parametrize(
        ("dest", "reason"),
        [
            (tls("web.example.com"), Reason.PROTOCOL_NOT_ALLOWED),
            (http("web.example.com", port=8080), Reason.PORT_NOT_ALLOWED),
            (http("web.example.com", method="DELETE", path="/v1/x"), Reason.METHOD_NOT_ALLOWED),
            (http("web.example.com", path="/admin"), Reason.PATH_NOT_ALLOWED),
            (http("web.example.com", path="/v1/../admin"), Reason.PATH_NOT_ALLOWED),
            (http("web.example.com", path="/v1/%2e%2e/admin"), Reason.PATH_NOT_ALLOWED),
            (http("web.example.com", path="/v1/..%2fadmin"), Reason.PATH_NOT_ALLOWED),
        ],
    )
    def test_nearest_rule_gives_the_reason(self, dest: Destination, reason: Reason) -> None:
        """The reason is the stage at which the closest rule failed."""
        d = decide(snapshot(SHOP), who(), dest)
        assert (d.allowed, d.reason, d.rule) == (False, reason, "shop/egress-policy/web")

    def test_http_match_allows(self) -> None:
        """Method and path prefix within the rule allow; query strings are ignored."""
        d = decide(snapshot(SHOP), who(), http("web.example.com", path="/v1/items?q=1"))
        assert d.allowed

    def test_expired_rule_is_not_applied(self) -> None:
        """A time-boxed exception stops allowing at its expiry."""
        body = "rules: [{name: tmp, hosts: [x.io], expires: '2030-01-01T00:00:00Z'}]"
        s = snapshot(cm("shop", body))
        before = time.mktime((2029, 12, 31, 0, 0, 0, 0, 0, 0))
        assert decide(s, who(), tls("x.io"), now=before).allowed
        d = decide(s, who(), tls("x.io"), now=1_900_000_000)
        assert d.reason is Reason.RULE_EXPIRED and "expired at 2030-01-01" in d.explanation[0].why


class TestRequestChecks:
    @pytest.mark.parametrize(
        ("dest", "reason"),
        [
            (tls("1.2.3.4"), Reason.IP_LITERAL),
            (http("[::1]:443"), Reason.IP_LITERAL),
            (tls("api.kadath.io@evil.com"), Reason.INVALID_HOST),
            (Destination(443, Protocol.TLS), Reason.INVALID_HOST),
            (http("api.kadath.io", sni="evil.com"), Reason.SNI_HOST_MISMATCH),
        ],
    )
    def test_request_level_denials(self, dest: Destination, reason: Reason) -> None:
        """Bad names, IPs and domain fronting are denied before any rule."""
        d = decide(snapshot(SHOP), who(labels={"function": "api-connector"}), dest)
        assert (d.allowed, d.reason) == (False, reason)

    def test_same_sni_and_host_is_fine(self) -> None:
        """SNI and Host naming the same host (any case, with port) is no mismatch."""
        d = decide(
            snapshot(SHOP),
            who(labels={"function": "api-connector"}),
            http("API.kadath.io:443", sni="api.kadath.io", port=443),
        )
        assert d.allowed

    @pytest.mark.parametrize(
        "principal",
        [
            "",
            "spiffe://other.domain/ns/shop/sa/cart",
            "spiffe://cluster.local/ns/shop/sa/",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns/shop/sa/cart/extra",
            "https://cluster.local/ns/shop/sa/cart",
            "spiffe://cluster.local.evil.com/ns/shop/sa/cart",
        ],
    )
    def test_untrusted_identity(self, principal: str) -> None:
        """Only a SPIFFE id of the configured trust domain identifies a caller."""
        d = decide(snapshot(SHOP), Identity(principal, "10.0.0.9"), tls("api.kadath.io"))
        assert (d.allowed, d.reason) == (False, Reason.UNTRUSTED_IDENTITY)

    def test_identity_mismatch(self) -> None:
        """The Pod at the source IP must have the certificate's namespace and account."""
        pod = Workload(
            "shop", "frontend", MappingProxyType({"function": "api-connector"}), "fe", "10.0.0.9"
        )
        ident = Identity("spiffe://cluster.local/ns/shop/sa/cart", "10.0.0.9", pod)
        d = decide(snapshot(SHOP), ident, tls("api.kadath.io"))
        assert d.reason is Reason.IDENTITY_MISMATCH and "shop/fe" in d.message

    def test_parse_principal_cached_and_exact(self) -> None:
        """The principal parser returns namespace and account, or why not."""
        assert parse_principal("spiffe://cluster.local/ns/a/sa/b", "cluster.local") == (
            "a",
            "b",
            "",
        )
        assert parse_principal("spiffe://td/ns/a/sa/b", "cluster.local")[2]


class TestTiersAndModes:
    CLUSTER = cm(
        CLUSTER_NS, "deny: [api.stealyourmoney.com, '*.bad.io']", cluster=True, name="cluster"
    )

    def test_cluster_deny_beats_namespace_allow(self) -> None:
        """Cluster deny wins over any allow, exact or wildcard."""
        ns = cm("shop", "rules: [{name: r, hosts: [api.stealyourmoney.com, x.bad.io]}]")
        s = snapshot(ns, self.CLUSTER)
        for host in ("api.stealyourmoney.com", "x.bad.io"):
            d = decide(s, who(), tls(host))
            assert d.reason is Reason.CLUSTER_DENIED and not d.allowed
            assert d.explanation[0].rule.startswith("egress-authz/cluster/deny[")

    def test_audit_mode_allows_and_records(self) -> None:
        """In audit mode a would-be denial is allowed with verdict audit."""
        s = snapshot(cm("shop", "mode: audit\nrules: [{name: r, hosts: [a.io]}]"))
        d = decide(s, who(), tls("b.io"))
        assert (d.allowed, d.verdict, d.reason) == (True, Verdict.AUDIT, Reason.HOST_NOT_ALLOWED)
        assert decide(s, who(), tls("a.io")).verdict is Verdict.ALLOW

    @pytest.mark.parametrize(
        "dest",
        [tls("api.stealyourmoney.com"), tls("1.2.3.4"), tls("a..io"), http("a.io", sni="b.io")],
    )
    def test_audit_never_lifts_request_level_denials(self, dest: Destination) -> None:
        """Cluster deny, bad names, IPs, SNI/Host mismatch are enforced in audit mode."""
        s = snapshot(cm("shop", "mode: audit\nrules: []"), self.CLUSTER)
        d = decide(s, who(), dest)
        assert not d.allowed and d.verdict is Verdict.DENY

    def test_audit_never_lifts_untrusted_identity(self) -> None:
        """An unknown caller is denied whatever the mode."""
        s = snapshot(cm("shop", "mode: audit\nrules: []"))
        assert not decide(s, Identity("spiffe://evil/ns/shop/sa/x"), tls("a.io")).allowed

    def test_enforce_wins_a_mode_conflict(self) -> None:
        """One enforcing ConfigMap keeps the namespace enforced."""
        s = snapshot(
            cm("shop", "mode: audit\nrules: []"), cm("shop", "mode: enforce\nrules: []", name="b")
        )
        assert not decide(s, who(), tls("a.io")).allowed

    def test_cluster_audit_mode_covers_namespaces_without_policy(self) -> None:
        """A cluster policy in audit mode dry-runs namespaces that have none yet."""
        s = snapshot(cm(CLUSTER_NS, "mode: audit", cluster=True, name="c"), SHOP)
        d = decide(s, who("billing", "x"), tls("a.io"))
        assert (d.verdict, d.reason) == (Verdict.AUDIT, Reason.NO_POLICY)
        assert not decide(s, who(), tls("a.io")).allowed  # shop has its own, enforcing


class TestExplanation:
    def test_lists_candidates_and_why(self) -> None:
        """A denial names each nearby rule and the first condition it failed."""
        d = decide(snapshot(SHOP), who(labels={"function": "finance"}), tls("api.kadath.io"))
        whys = {c.rule: c.why for c in d.explanation}
        assert (
            whys["shop/egress-policy/kadath"]
            == "workload labels function=finance do not match matchLabels function=api-connector"
        )
        assert (
            "host api.kadath.io is not in hosts [api.leng.com]"
            in whys["shop/egress-policy/finance"]
        )

    def test_bounded(self) -> None:
        """However many rules a namespace has, an explanation stays short."""
        body = "rules:\n" + "".join(f"  - {{name: r{i}, hosts: [h{i}.io]}}\n" for i in range(100))
        d = decide(snapshot(cm("shop", body)), who(), tls("nope.io"))
        assert len(d.explanation) == 20


class TestMisc:
    def test_decision_ids_are_unique(self) -> None:
        """Ids never repeat within a process."""
        ids = {new_decision_id() for _ in range(10_000)}
        assert len(ids) == 10_000

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/v1/x?y=../z", "/v1/x"),
            ("/v1/./x", "/v1/x"),
            ("/v1/../admin", "/admin"),
            ("/../../etc", "/etc"),
            ("/v1/%2E%2E/admin", "/admin"),
            ("/v1/%2fadmin", None),
            ("/v1\\..\\admin", None),
            ("v1", None),
        ],
    )
    def test_clean_path(self, path: str, expected: str | None) -> None:
        """Paths are resolved before prefix matching, or refused when ambiguous."""
        assert clean_path(path) == expected

    def test_lookup_cost_independent_of_unrelated_rules(self) -> None:
        """The candidates for a host come from its own index entries only:
        100,000 other hosts add no candidates (the index, not a timer, is asserted)."""
        big = "rules:\n" + "".join(
            f"  - {{name: r{i}, hosts: [h{i}.io, '*.w{i}.io']}}\n" for i in range(2000)
        )
        s = snapshot(cm("shop", big, name="big"), SHOP)
        scope = s.namespaces["shop"]
        assert len(scope.exact["h5.io"]) == 1 and len(scope.wild["w5.io"]) == 1
        assert decide(s, who(), tls("a.w5.io")).rule == "shop/big/r5"


class TestExactPaths:
    BODY = (
        "rules: [{name: r, hosts: [x.io], ports: [80], protocols: [HTTP],"
        " http: {exactPaths: ['/', /v1/orders], paths: [/static/]}}]"
    )

    @pytest.mark.parametrize(
        ("path", "allowed"),
        [
            ("/", True),
            ("/v1/orders", True),
            ("/v1/orders?page=2", True),  # the query is not part of the path
            ("/v1/x/../orders", True),  # resolved first, like prefixes
            ("/static/app.js", True),  # the prefix still applies beside exact paths
            ("/admin", False),  # `/` exact is not a prefix of everything
            ("/v1/orders/1", False),
            ("/v1/ordersX", False),
            ("/v1/", False),
            ("/v1/orders%2f..", False),  # encoded slash: never matches
        ],
    )
    def test_exact_means_the_whole_path(self, path: str, allowed: bool) -> None:
        """exactPaths matches the whole resolved path and nothing below or beside it."""
        d = decide(snapshot(cm("shop", self.BODY)), who(), http("x.io", path=path))
        assert d.allowed is allowed, (path, d.reason)

    def test_explained(self) -> None:
        """A path denial names both lists as written."""
        d = decide(snapshot(cm("shop", self.BODY)), who(), http("x.io", path="/admin"))
        assert d.explanation[0].why == (
            "path /admin starts with none of [/static/] and is none of exactPaths [/, /v1/orders]"
        )
