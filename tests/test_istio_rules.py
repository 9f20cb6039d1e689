"""What `render` writes holds to Istio's own rules (tests/istio_rules.py), on every policy
set in the repository and on generated ones; and the checker itself catches each rule."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from authz.loader import build_policy_set, load_path
from authz.model import PolicySet
from authz.policy import PolicyError, parse_configmap
from authz.render import render
from tests.istio_rules import Mesh, check
from tests.schemas import skip_unless_istio_schemas, validate_istio

ROOT = Path(__file__).resolve().parent.parent
SVC_NS = "egress-authz"
NO_POLICY_NS = "no-policy"  # a namespace that has no policy of its own: sees only the cluster tier


def cm(ns: str, rules: list[dict[str, Any]], *, name: str = "p", cluster: bool = False,
       deny: list[str] | None = None) -> dict[str, Any]:
    labels = {"egress-authz.io/tier": "cluster"} if cluster else {"egress-authz.io/policy": "true"}
    body: dict[str, Any] = {"rules": rules}
    if deny:
        body["deny"] = deny
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": labels, "uid": f"{ns}-{name}"},
            "data": {"policy.yaml": yaml.safe_dump(body)}}


def policies(*cms: dict[str, Any]) -> PolicySet:
    return build_policy_set(parse_configmap(c, cluster_namespace=SVC_NS) for c in cms)


def assert_istio_accepts(objs: list[dict[str, Any]], installed: list[dict[str, Any]], *,
                         wildcards: bool = False) -> None:
    problems = check(objs, installed=installed, namespaces=[NO_POLICY_NS],
                     mesh=Mesh(allow_unrouted_wildcards=wildcards))
    assert not problems, "\n".join(problems)


class TestRepositoryPolicySets:
    """Every policy set shipped in the repository renders to objects Istio accepts and routes."""

    @pytest.mark.parametrize("path", ["istio/examples", "examples", "authz/demo/policies"])
    def test_policy_set(self, path: str, chart_gateways: list[dict[str, Any]]) -> None:
        """Render passes the checker, seen from every namespace, one with no policy included."""
        loaded = load_path(ROOT / path, cluster_namespace=SVC_NS)
        assert not loaded.problems
        objs = render(build_policy_set(loaded.policies))
        # marketing's *.kadath.io: wildcards are admitted, not routed (docs/kubernetes.md).
        assert_istio_accepts(objs, chart_gateways, wildcards=True)

    def test_e2e_set_with_the_examples(self, chart_gateways: list[dict[str, Any]]) -> None:
        """What istio/e2e-kind.sh applies (examples plus istio/e2e) passes as one set."""
        sets = [load_path(ROOT / d, cluster_namespace=SVC_NS) for d in ("istio/examples",
                                                                         "istio/e2e")]
        assert not any(s.problems for s in sets)
        objs = render(build_policy_set([p for s in sets for p in s.policies]))
        assert_istio_accepts(objs, chart_gateways, wildcards=True)
        names = [s["port"]["name"] for o in objs if o["kind"] == "Gateway"
                 for s in o["spec"]["servers"]]
        assert len(names) == len(set(names)) >= 5  # kadath 443+8443, leng, two slug-alikes

    def test_demo_set_is_examples_plus_audit_namespace(
            self, chart_gateways: list[dict[str, Any]]) -> None:
        """The demo loads istio/examples next to its own directory: the union passes too."""
        loaded = load_path(ROOT / "istio" / "examples", cluster_namespace=SVC_NS)
        demo = load_path(ROOT / "authz" / "demo" / "policies", cluster_namespace=SVC_NS)
        objs = render(build_policy_set([*loaded.policies, *demo.policies]))
        assert_istio_accepts(objs, chart_gateways, wildcards=True)


class TestDefects:
    """Each defect of issue 11 that render had, as the checker sees it."""

    def test_two_tls_hosts_give_unique_server_port_names(
            self, chart_gateways: list[dict[str, Any]]) -> None:
        """Item 1: two exact TLS hosts; Istio's webhook refuses duplicate server port names."""
        objs = render(policies(cm("shop", [{"name": "a", "hosts": ["api.kadath.io",
                                                                    "api.leng.com"]}])))
        [gateway] = [o for o in objs if o["kind"] == "Gateway"]
        names = [s["port"]["name"] for s in gateway["spec"]["servers"]]
        assert len(names) == 2 and len(set(names)) == 2
        assert_istio_accepts(objs, chart_gateways)

    def test_cluster_tier_from_a_namespace_without_policy(
            self, chart_gateways: list[dict[str, Any]]) -> None:
        """Item 3: a baseline host, dialled from a namespace with no policy, finds its subset."""
        objs = render(policies(cm(SVC_NS, [{"name": "base", "hosts": ["status.io"]}],
                                  cluster=True),
                               cm("shop", [{"name": "a", "hosts": ["api.kadath.io"]}])))
        assert_istio_accepts(objs, chart_gateways)

    def test_hosts_that_slug_alike_keep_their_own_objects(
            self, chart_gateways: list[dict[str, Any]]) -> None:
        """Item 4: my-api.example.com and my.api-example.com each keep a route and a subset."""
        objs = render(policies(cm("shop", [{"name": "a", "hosts": ["my-api.example.com",
                                                                    "my.api-example.com"]}])))
        vs_hosts = sorted(o["spec"]["hosts"][0] for o in objs if o["kind"] == "VirtualService")
        assert vs_hosts == ["my-api.example.com", "my.api-example.com"]
        assert_istio_accepts(objs, chart_gateways)

    def test_each_external_port_has_its_own_route(
            self, chart_gateways: list[dict[str, Any]]) -> None:
        """Item 2 (render): TLS on 8443 and 443 go through gateway ports 8443 and 443 and leave
        the gateway on the port the app dialled; HTTP on 8080 likewise."""
        objs = render(policies(cm("shop", [
            {"name": "a", "hosts": ["api.kadath.io"], "ports": [443, 8443]},
            {"name": "b", "hosts": ["plain.kadath.io"], "ports": [8080], "protocols": ["HTTP"]},
        ])))
        assert_istio_accepts(objs, chart_gateways)
        [gateway] = [o for o in objs if o["kind"] == "Gateway"]
        served = {(s["hosts"][0], s["port"]["number"]) for s in gateway["spec"]["servers"]}
        assert {("api.kadath.io", 443), ("api.kadath.io", 8443),
                ("plain.kadath.io", 8080)} <= served

    def test_namespace_in_the_gateway_namespace(
            self, chart_gateways: list[dict[str, Any]]) -> None:
        """A policy in the gateway's own namespace: exportTo never lists it twice."""
        objs = render(policies(cm("istio-egress", [{"name": "a", "hosts": ["api.kadath.io"]}])))
        assert_istio_accepts(objs, chart_gateways)

    def test_host_in_baseline_and_namespace_on_other_ports(
            self, chart_gateways: list[dict[str, Any]]) -> None:
        """Baseline allows a host on 443, a namespace on 8443: both ports route from there,
        443 still routes from everywhere else."""
        objs = render(policies(cm(SVC_NS, [{"name": "b", "hosts": ["api.kadath.io"]}],
                                  cluster=True),
                               cm("shop", [{"name": "a", "hosts": ["api.kadath.io"],
                                            "ports": [8443]}])))
        assert_istio_accepts(objs, chart_gateways)

    def test_policy_in_the_root_namespace(self, chart_gateways: list[dict[str, Any]]) -> None:
        """A sidecar in the root namespace (istio-system) first finds only that namespace's
        private DestinationRules: an exported one there is looked at after the gateway
        namespace's, which lacks this namespace's subsets."""
        objs = render(policies(cm(SVC_NS, [{"name": "b", "hosts": ["status.io"]}], cluster=True),
                               cm("istio-system", [{"name": "a", "hosts": ["api.kadath.io"]}])))
        assert_istio_accepts(objs, chart_gateways)

    def test_one_host_on_different_ports_in_two_namespaces(
            self, chart_gateways: list[dict[str, Any]]) -> None:
        """shop allows api.kadath.io on 443, billing on 443 and 8443: the gateway keeps one
        ServiceEntry per hostname across namespaces (the oldest; Istio merges only within a
        namespace), so it must see one that has every port it routes the host to."""
        objs = render(policies(cm("shop", [{"name": "a", "hosts": ["api.kadath.io"]}]),
                               cm("billing", [{"name": "a", "hosts": ["api.kadath.io"],
                                               "ports": [443, 8443]}])))
        assert_istio_accepts(objs, chart_gateways)


HOST_LABELS = ["my", "api", "my-api", "api-example", "example", "x--y", "a"]
hosts_st = st.builds(
    lambda labels, tld, wild: ("*." if wild else "") + ".".join([*labels, tld]),
    st.lists(st.sampled_from(HOST_LABELS), min_size=1, max_size=3),
    st.sampled_from(["com", "io"]),
    st.integers(0, 4).map(lambda i: i == 0),  # one host in five a wildcard
)
rule_st = st.fixed_dictionaries(
    {"hosts": st.lists(hosts_st, min_size=1, max_size=4, unique=True),
     "ports": st.lists(st.sampled_from([443, 80, 8443, 8080]), min_size=1, max_size=3,
                       unique=True)},
    optional={"protocols": st.sampled_from([["HTTP"], ["TLS"], ["TLS", "HTTP"]])})


@st.composite
def policy_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    cms = []
    for ns in draw(st.lists(st.sampled_from(["shop", "billing", "ops", "istio-egress", "istio-system",
                                             "a" * 50]),
                            max_size=4, unique=True)):
        rules = draw(st.lists(rule_st, min_size=1, max_size=3))
        cms.append(cm(ns, [{"name": f"r{i}", **r} for i, r in enumerate(rules)]))
    if draw(st.booleans()):
        rules = draw(st.lists(rule_st, max_size=2))
        deny = draw(st.lists(hosts_st, max_size=2))
        cms.append(cm(SVC_NS, [{"name": f"c{i}", **r} for i, r in enumerate(rules)],
                      cluster=True, deny=deny))
    return cms


class TestGenerated:
    """Generated policy sets: colliding slugs, many namespaces, cluster tier, several ports."""

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(cms=policy_sets())
    def test_render_passes_the_checker(self, cms: list[dict[str, Any]],
                                       chart_gateways: list[dict[str, Any]]) -> None:
        """Whatever the policies, what render writes passes Istio's rules from every namespace."""
        try:
            ps = policies(*cms)
        except PolicyError:  # a generated rule the parser refuses is not this test's subject
            assume(False)
            return
        objs = render(ps)
        assert_istio_accepts(objs, chart_gateways, wildcards=True)

    @settings(max_examples=15, deadline=None)
    @given(cms=policy_sets())
    def test_rendered_objects_validate(self, cms: list[dict[str, Any]]) -> None:
        """And every object still validates against the CRD schemas."""
        skip_unless_istio_schemas()
        for o in render(policies(*cms)):
            validate_istio(o)


class TestCheckerCatches:
    """The checker is only worth what it catches: each rule, broken on purpose."""

    @pytest.fixture
    def good(self) -> list[dict[str, Any]]:
        return render(policies(cm(SVC_NS, [{"name": "b", "hosts": ["status.io"]}], cluster=True),
                               cm("shop", [{"name": "a", "hosts": ["api.kadath.io",
                                                                   "api.leng.com"]}])))

    def problems(self, objs: list[dict[str, Any]], gws: list[dict[str, Any]]) -> str:
        return "\n".join(check(objs, installed=gws, namespaces=[NO_POLICY_NS]))

    def test_good_is_clean(self, good: list[dict[str, Any]],
                           chart_gateways: list[dict[str, Any]]) -> None:
        """The baseline the mutations below start from passes."""
        assert self.problems(good, chart_gateways) == ""

    def test_duplicate_server_port_name(self, good: list[dict[str, Any]],
                                        chart_gateways: list[dict[str, Any]]) -> None:
        """ValidateGateway: two servers named alike."""
        gw = next(o for o in good if o["kind"] == "Gateway")
        for s in gw["spec"]["servers"]:
            s["port"]["name"] = "tls"
        assert "port names in servers must be unique" in self.problems(good, chart_gateways)

    def test_duplicate_subset(self, good: list[dict[str, Any]],
                              chart_gateways: list[dict[str, Any]]) -> None:
        """ValidateDestinationRule: a subset defined twice."""
        dr = next(o for o in good if o["kind"] == "DestinationRule"
                  and o["metadata"]["namespace"] == "shop")
        dr["spec"]["subsets"].append(copy.deepcopy(dr["spec"]["subsets"][0]))
        assert "duplicate subset names" in self.problems(good, chart_gateways)

    def test_duplicate_object(self, good: list[dict[str, Any]],
                              chart_gateways: list[dict[str, Any]]) -> None:
        """Two objects with one (kind, namespace, name): one of them is lost."""
        vs = [o for o in good if o["kind"] == "VirtualService"
              and o["metadata"]["namespace"] == "shop"]
        vs[1]["metadata"]["name"] = vs[0]["metadata"]["name"]
        assert "written 2 times" in self.problems(good, chart_gateways)

    def test_host_without_route(self, good: list[dict[str, Any]],
                                chart_gateways: list[dict[str, Any]]) -> None:
        """A ServiceEntry host whose VirtualService is gone is dialled directly."""
        objs = [o for o in good if not (o["kind"] == "VirtualService"
                                        and o["spec"]["hosts"] == ["api.leng.com"])]
        out = self.problems(objs, chart_gateways)
        assert "from shop: api.leng.com" in out and "without the gateway" in out

    def test_subset_missing_where_the_sidecar_looks(
            self, good: list[dict[str, Any]], chart_gateways: list[dict[str, Any]]) -> None:
        """Lookup order: a namespace DR without the baseline subset shadows the cluster DR."""
        dr = next(o for o in good if o["kind"] == "DestinationRule"
                  and o["metadata"]["namespace"] == "shop")
        dr["spec"]["subsets"] = [s for s in dr["spec"]["subsets"]
                                 if s["trafficPolicy"]["tls"]["sni"] != "status.io"]
        out = self.problems(good, chart_gateways)
        assert "from shop: status.io:443" in out and "the DestinationRule this sidecar finds" in out
        assert "from no-policy" not in out

    def test_cluster_dr_out_of_reach(self, good: list[dict[str, Any]],
                                     chart_gateways: list[dict[str, Any]]) -> None:
        """A DR in a namespace no lookup step visits (the service's own) is never found."""
        for o in good:
            if o["kind"] == "DestinationRule" and o["metadata"]["namespace"] != "shop":
                o["metadata"]["namespace"] = SVC_NS
        assert "from no-policy: status.io:443" in self.problems(good, chart_gateways)

    def test_gateway_server_without_route(self, good: list[dict[str, Any]],
                                          chart_gateways: list[dict[str, Any]]) -> None:
        """A Gateway server no VirtualService is bound to for its host and port."""
        gw = next(o for o in good if o["kind"] == "Gateway")
        extra = copy.deepcopy(gw["spec"]["servers"][0])
        extra["hosts"] = ["nobody.example"]
        extra["port"]["name"] = "tls-nobody"
        gw["spec"]["servers"].append(extra)
        assert "(nobody.example:443): no VirtualService bound" in self.problems(
            good, chart_gateways)

    def test_gateway_routes_to_the_wrong_port(self, good: list[dict[str, Any]],
                                              chart_gateways: list[dict[str, Any]]) -> None:
        """The gateway leg must leave on the port the app dialled."""
        vs = next(o for o in good if o["kind"] == "VirtualService"
                  and o["spec"]["hosts"] == ["api.leng.com"])
        vs["spec"]["tcp"][0]["route"][0]["destination"]["port"]["number"] = 8443
        assert "the gateway routes it to api.leng.com:8443" in self.problems(good, chart_gateways)

    def test_export_to_duplicates(self, good: list[dict[str, Any]],
                                  chart_gateways: list[dict[str, Any]]) -> None:
        """validateExportTo: "." and the object's own namespace are the same entry."""
        se = next(o for o in good if o["kind"] == "ServiceEntry"
                  and o["metadata"]["namespace"] == "shop")
        se["spec"]["exportTo"] = [".", "shop"]
        assert "duplicate entries in exportTo" in self.problems(good, chart_gateways)

    def test_wildcard_is_reported_unless_allowed(self, chart_gateways: list[dict[str, Any]]
                                                 ) -> None:
        """A wildcard host is dialable but unrouted: reported unless the test opts in."""
        objs = render(policies(cm("shop", [{"name": "a", "hosts": ["*.kadath.io"]}])))
        assert "a wildcard host is dialable but not routed" in self.problems(objs, chart_gateways)
        assert not check(objs, installed=chart_gateways, mesh=Mesh(allow_unrouted_wildcards=True))
