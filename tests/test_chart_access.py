"""Who may call the service: the chart's fence around its own ports.

The chart renders an Istio AuthorizationPolicy and PeerAuthentication on the
service's pods and a Kubernetes ingress NetworkPolicy doing the same at layer 3.
Besides schema validation (real Helm, kubernetes-validate, the Istio CRDs), each
rendered policy is evaluated by a small model of its semantics, so the tests say
who gets in, not only which fields are set.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterator
from typing import Any

import helm_python as helm
import pytest

from tests.schemas import is_istio, requires_istio_schemas, validate_istio
from tests.test_chart import (
    CHART_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    container,
    kube_validate_strict,
    notes,
    one,
    render,
)

GATEWAY_NS = "istio-egress"
# Our gateway pods carry the chart's default gateway selector (istio/ gives them both labels).
GATEWAY_LABELS = {"istio": "egressgateway", "egress-authz.io/gateway": "egress-authz"}
HELM_GATEWAY = f"cluster.local/ns/{GATEWAY_NS}/sa/istio-egressgateway"
ISTIOCTL_GATEWAY = f"cluster.local/ns/{GATEWAY_NS}/sa/istio-egressgateway-service-account"
PROMETHEUS = "cluster.local/ns/monitoring/sa/prometheus"

WIDE: dict[str, Any] = {
    "access": {
        "check": {"extraPrincipals": ["cluster.local/ns/edge-two/sa/gateway"]},
        "admin": {
            "namespaces": ["monitoring"],
            "principals": ["cluster.local/ns/ops/sa/oncall"],
            "ipBlocks": ["10.20.0.0/16"],
        },
        "mtls": {"adminMode": "PERMISSIVE"},
        "networkPolicy": {
            "ambient": True,
            "extraIngress": [{"ports": [{"protocol": "TCP", "port": 15090}]}],
        },
    }
}
ACCESS_VARIANTS = [
    ("default", {}),
    ("wide", WIDE),
    ("ports", {"ports": {"grpc": 7000, "admin": 7001}}),
]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def access_objects(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """The access objects in the release namespace, by kind (absent kinds missing)."""
    found = {}
    for obj in render(chart, values):
        if obj["metadata"].get("namespace") != NAMESPACE:
            continue
        if obj["kind"] in ("AuthorizationPolicy", "PeerAuthentication", "NetworkPolicy"):
            assert obj["kind"] not in found, f"two {obj['kind']} in {NAMESPACE}"
            found[obj["kind"]] = obj
    return found


def pod_labels(chart: helm.Chart, values: dict[str, Any] | None = None) -> dict[str, str]:
    labels: dict[str, str] = one(render(chart, values), "Deployment")["spec"]["template"][
        "metadata"
    ]["labels"]
    return labels


def _labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "the model knows matchLabels only"
    return dict(selector.get("matchLabels") or {}).items() <= labels.items()


def network_policy_admits(
    policy: dict[str, Any],
    *,
    namespace: str | None,
    labels: dict[str, str] | None = None,
    ip: str = "192.0.2.1",
    port: int,
) -> bool:
    """NetworkPolicy ingress semantics: any rule whose ports and peers both match.

    namespace=None is a caller that is not a pod (an address outside the cluster).
    """
    ns_labels = {"kubernetes.io/metadata.name": namespace} if namespace else None
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports")
        if ports is not None and not any(p.get("port") == port for p in ports):
            continue
        peers = rule.get("from")
        if peers is None:
            return True
        for peer in peers:
            if "ipBlock" in peer:
                if ns_labels is None and ipaddress.ip_address(ip) in ipaddress.ip_network(
                    peer["ipBlock"]["cidr"]
                ):
                    return True
                continue
            if ns_labels is None:
                continue
            ns_ok = "namespaceSelector" not in peer or _labels_match(
                peer["namespaceSelector"], ns_labels
            )
            # A peer without namespaceSelector means the policy's own namespace.
            if "namespaceSelector" not in peer:
                ns_ok = namespace == policy["metadata"]["namespace"]
            pod_ok = "podSelector" not in peer or _labels_match(peer["podSelector"], labels or {})
            if ns_ok and pod_ok:
                return True
    return False


def authorization_admits(
    policy: dict[str, Any], *, principal: str | None, ip: str = "192.0.2.1", port: int
) -> bool:
    """Istio ALLOW semantics: some rule has a matching source and a matching port.

    principal=None is a plaintext caller (no mesh identity).
    """
    assert policy["spec"]["action"] == "ALLOW"
    for rule in policy["spec"].get("rules", []):
        ports = {p for to in rule.get("to", []) for p in to["operation"].get("ports", [])}
        if ports and str(port) not in ports:
            continue
        for entry in rule.get("from", []):
            source = entry["source"]
            ok = True
            if "principals" in source:
                ok &= principal is not None and any(
                    fnmatch.fnmatchcase(principal, p) for p in source["principals"]
                )
            if "namespaces" in source:
                ok &= principal is not None and principal.split("/")[2] in source["namespaces"]
            if "ipBlocks" in source:
                ok &= any(
                    ipaddress.ip_address(ip) in ipaddress.ip_network(c) for c in source["ipBlocks"]
                )
            if ok:
                return True
    return False


class TestValidate:
    """The access objects render valid in every variant."""

    @pytest.mark.parametrize(
        ("variant", "values"), ACCESS_VARIANTS, ids=[v[0] for v in ACCESS_VARIANTS]
    )
    def test_network_policy_validates(
        self, chart: helm.Chart, variant: str, values: dict[str, Any]
    ) -> None:
        """The NetworkPolicy passes strict OpenAPI validation, oldest and newest Kubernetes."""
        policy = access_objects(chart, values)["NetworkPolicy"]
        for version in KUBE_VERSIONS:
            kube_validate_strict(policy, version)

    @requires_istio_schemas
    @pytest.mark.parametrize(
        ("variant", "values"), ACCESS_VARIANTS, ids=[v[0] for v in ACCESS_VARIANTS]
    )
    def test_istio_objects_validate(
        self, chart: helm.Chart, variant: str, values: dict[str, Any]
    ) -> None:
        """AuthorizationPolicy and PeerAuthentication pass the Istio CRD schemas."""
        objects = access_objects(chart, values)
        for kind in ("AuthorizationPolicy", "PeerAuthentication"):
            assert is_istio(objects[kind])
            validate_istio(objects[kind])

    @pytest.mark.parametrize(
        ("variant", "values"), ACCESS_VARIANTS, ids=[v[0] for v in ACCESS_VARIANTS]
    )
    def test_lint_clean(self, variant: str, values: dict[str, Any]) -> None:
        """`helm lint --strict` finds nothing in the widened and re-ported variants."""
        report = helm.lint(
            CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
        )
        assert not [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"], report["errors"]


class TestByDefault:
    """Installed with defaults, only the egress gateway reaches Check, nobody the admin port."""

    def test_rendered_by_default(self, chart: helm.Chart) -> None:
        """All three objects exist without any value set, and select exactly the service's pods."""
        objects = access_objects(chart)
        assert set(objects) == {"AuthorizationPolicy", "PeerAuthentication", "NetworkPolicy"}
        labels = pod_labels(chart)
        service = one(render(chart), "Service")
        for obj in objects.values():
            selector = obj["spec"].get("selector") or obj["spec"]["podSelector"]
            assert _labels_match(selector, labels), obj["kind"]
            # Not a namespace-wide selector: other pods of the namespace are not fenced by it.
            assert selector["matchLabels"] == service["spec"]["selector"]

    def test_authorization_policy_check_only_from_gateway(self, chart: helm.Chart) -> None:
        """Both gateway service-account principals reach Check; a pod elsewhere does not."""
        policy = access_objects(chart)["AuthorizationPolicy"]
        assert policy["spec"]["action"] == "ALLOW"
        for principal in (HELM_GATEWAY, ISTIOCTL_GATEWAY):
            assert authorization_admits(policy, principal=principal, port=9000)
            assert not authorization_admits(policy, principal=principal, port=9090)
        for stranger in (
            "cluster.local/ns/shop/sa/cart",
            f"cluster.local/ns/{GATEWAY_NS}/sa/default",  # another pod in the gateway namespace
            f"evil.example/ns/{GATEWAY_NS}/sa/istio-egressgateway",  # another trust domain
        ):
            assert not authorization_admits(policy, principal=stranger, port=9000), stranger
        assert not authorization_admits(policy, principal=None, port=9000)

    def test_admin_port_closed(self, chart: helm.Chart) -> None:
        """No caller at all reaches the admin port, at layer 7 or layer 3."""
        objects = access_objects(chart)
        for principal in (PROMETHEUS, HELM_GATEWAY, None):
            assert not authorization_admits(
                objects["AuthorizationPolicy"], principal=principal, port=9090
            )
        policy = objects["NetworkPolicy"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for namespace, labels in (
            ("monitoring", {}),
            (GATEWAY_NS, GATEWAY_LABELS),
            (NAMESPACE, {}),
        ):
            assert not network_policy_admits(policy, namespace=namespace, labels=labels, port=9090)
        assert not network_policy_admits(policy, namespace=None, ip="10.0.0.5", port=9090)

    def test_network_policy_check_only_from_gateway_pods(self, chart: helm.Chart) -> None:
        """Layer 3: the gateway pods reach 9000; other pods of its namespace and other namespaces do not."""
        policy = access_objects(chart)["NetworkPolicy"]
        assert network_policy_admits(policy, namespace=GATEWAY_NS, labels=GATEWAY_LABELS, port=9000)
        assert not network_policy_admits(
            policy, namespace=GATEWAY_NS, labels={"app": "x"}, port=9000
        )
        assert not network_policy_admits(policy, namespace="shop", labels=GATEWAY_LABELS, port=9000)
        assert not network_policy_admits(policy, namespace=NAMESPACE, labels={}, port=9000)

    def test_strict_mtls(self, chart: helm.Chart) -> None:
        """PeerAuthentication STRICT on the service's pods, no port left permissive."""
        spec = access_objects(chart)["PeerAuthentication"]["spec"]
        assert spec["mtls"] == {"mode": "STRICT"}
        assert "portLevelMtls" not in spec

    def test_ports_follow_values(self, chart: helm.Chart) -> None:
        """The fences name the container ports the service actually listens on."""
        values = {
            "ports": {"grpc": 7000, "admin": 7001},
            "access": {"admin": {"namespaces": ["monitoring"]}},
        }
        objects = access_objects(chart, values)
        assert {p["containerPort"] for p in container(render(chart, values))["ports"]} == {
            7000,
            7001,
        }
        assert authorization_admits(
            objects["AuthorizationPolicy"], principal=HELM_GATEWAY, port=7000
        )
        assert not authorization_admits(
            objects["AuthorizationPolicy"], principal=HELM_GATEWAY, port=9000
        )
        assert authorization_admits(objects["AuthorizationPolicy"], principal=PROMETHEUS, port=7001)
        np = objects["NetworkPolicy"]
        assert network_policy_admits(np, namespace=GATEWAY_NS, labels=GATEWAY_LABELS, port=7000)
        assert network_policy_admits(np, namespace="monitoring", port=7001)
        assert not network_policy_admits(np, namespace="monitoring", port=7000)

    def test_follows_gateway_namespace_selector_and_trust_domain(self, chart: helm.Chart) -> None:
        """Principals use trustDomain and gatewayNamespace; layer 3 uses istio.gatewaySelector."""
        values = {
            "gatewayNamespace": "edge-out",
            "trustDomain": "corp.example",
            "istio": {"gatewaySelector": {"app": "my-egress"}},
        }
        objects = access_objects(chart, values)
        ap, np = objects["AuthorizationPolicy"], objects["NetworkPolicy"]
        assert authorization_admits(
            ap, principal="corp.example/ns/edge-out/sa/istio-egressgateway", port=9000
        )
        assert not authorization_admits(ap, principal=HELM_GATEWAY, port=9000)
        assert network_policy_admits(
            np, namespace="edge-out", labels={"app": "my-egress"}, port=9000
        )
        assert not network_policy_admits(np, namespace="edge-out", labels=GATEWAY_LABELS, port=9000)
        assert not network_policy_admits(np, namespace=GATEWAY_NS, labels=GATEWAY_LABELS, port=9000)


class TestWidening:
    """Values open the doors to exactly the callers they name."""

    def test_admin_callers(self, chart: helm.Chart) -> None:
        """Listed namespaces, principals and CIDRs reach the admin port, and not Check."""
        objects = access_objects(chart, WIDE)
        ap, np = objects["AuthorizationPolicy"], objects["NetworkPolicy"]
        for principal in (
            PROMETHEUS,
            "cluster.local/ns/monitoring/sa/anything",
            "cluster.local/ns/ops/sa/oncall",
        ):
            assert authorization_admits(ap, principal=principal, port=9090), principal
            assert not authorization_admits(ap, principal=principal, port=9000), principal
        assert not authorization_admits(ap, principal="cluster.local/ns/ops/sa/intruder", port=9090)
        assert authorization_admits(ap, principal=None, ip="10.20.3.4", port=9090)
        assert not authorization_admits(ap, principal=None, ip="10.21.3.4", port=9090)
        # Layer 3 cannot see service accounts: a principal's namespace is admitted whole.
        for namespace in ("monitoring", "ops"):
            assert network_policy_admits(np, namespace=namespace, port=9090)
            assert not network_policy_admits(np, namespace=namespace, port=9000)
        assert not network_policy_admits(np, namespace="shop", port=9090)
        assert network_policy_admits(np, namespace=None, ip="10.20.3.4", port=9090)
        assert not network_policy_admits(np, namespace=None, ip="10.21.3.4", port=9090)

    def test_extra_check_principal(self, chart: helm.Chart) -> None:
        """A second gateway's principal reaches Check; its namespace is admitted at layer 3."""
        objects = access_objects(chart, WIDE)
        second = "cluster.local/ns/edge-two/sa/gateway"
        assert authorization_admits(objects["AuthorizationPolicy"], principal=second, port=9000)
        assert authorization_admits(
            objects["AuthorizationPolicy"], principal=HELM_GATEWAY, port=9000
        )
        assert network_policy_admits(objects["NetworkPolicy"], namespace="edge-two", port=9000)

    def test_permissive_admin_port(self, chart: helm.Chart) -> None:
        """adminMode PERMISSIVE relaxes the admin port only; Check stays STRICT."""
        spec = access_objects(chart, WIDE)["PeerAuthentication"]["spec"]
        assert spec["mtls"] == {"mode": "STRICT"}
        assert spec["portLevelMtls"] == {"9090": {"mode": "PERMISSIVE"}}  # JSON keys

    def test_ambient(self, chart: helm.Chart) -> None:
        """ambient admits HBONE (15008) from the same callers, and ztunnel's probe address."""
        np = access_objects(chart, WIDE)["NetworkPolicy"]
        assert network_policy_admits(np, namespace=GATEWAY_NS, labels=GATEWAY_LABELS, port=15008)
        assert not network_policy_admits(np, namespace="shop", port=15008)
        assert network_policy_admits(np, namespace=None, ip="169.254.7.127", port=9090)
        default = access_objects(chart)["NetworkPolicy"]
        assert not network_policy_admits(
            default, namespace=GATEWAY_NS, labels=GATEWAY_LABELS, port=15008
        )

    def test_extra_ingress(self, chart: helm.Chart) -> None:
        """extraIngress rules are appended as given."""
        np = access_objects(chart, WIDE)["NetworkPolicy"]
        assert np["spec"]["ingress"][-1] == {"ports": [{"protocol": "TCP", "port": 15090}]}


class TestTurningOff:
    """Each fence can be switched off alone; without Istio only the NetworkPolicy stays."""

    @pytest.mark.parametrize(
        ("values", "gone"),
        [
            ({"access": {"authorizationPolicy": {"enabled": False}}}, {"AuthorizationPolicy"}),
            ({"access": {"mtls": {"enabled": False}}}, {"PeerAuthentication"}),
            ({"access": {"networkPolicy": {"enabled": False}}}, {"NetworkPolicy"}),
            ({"istio": {"enabled": False}}, {"AuthorizationPolicy", "PeerAuthentication"}),
        ],
        ids=["authorizationPolicy", "mtls", "networkPolicy", "istio-off"],
    )
    def test_switch(self, chart: helm.Chart, values: dict[str, Any], gone: set[str]) -> None:
        """The switched-off objects are gone, the others still rendered."""
        kinds = set(access_objects(chart, values))
        assert kinds == {"AuthorizationPolicy", "PeerAuthentication", "NetworkPolicy"} - gone


class TestValues:
    """values.schema.json refuses access values that would render a wrong fence."""

    @pytest.mark.parametrize(
        "values",
        [
            {"access": {"admin": {"principals": ["spiffe://cluster.local/ns/monitoring/sa/p"]}}},
            {"access": {"admin": {"principals": ["monitoring/prometheus"]}}},
            {"access": {"check": {"extraPrincipals": ["cluster.local/ns/Bad_NS/sa/x"]}}},
            {"access": {"check": {"gatewayServiceAccounts": []}}},
            {"access": {"admin": {"namespaces": ["Monitoring"]}}},
            {"access": {"admin": {"ipBlocks": ["everyone"]}}},
            {"access": {"mtls": {"adminMode": "DISABLE"}}},
            {"access": {"networkPolicy": {"enable": True}}},
        ],
        ids=lambda v: str(v)[:60],
    )
    def test_rejects(self, chart: helm.Chart, values: dict[str, Any]) -> None:
        """Helm refuses to render with the wrong value, naming `access`."""
        with pytest.raises(helm.HelmError, match="access"):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError):
            chart.render(values=values, name=RELEASE, namespace=NAMESPACE)

    def test_notes_warn_when_prometheus_cannot_scrape(self, chart: helm.Chart) -> None:
        """A ServiceMonitor with a closed admin port gets a warning naming the value to set."""
        monitored = {"serviceMonitor": {"enabled": True}}
        assert "access.admin.namespaces" in notes(chart, monitored)
        opened = {**monitored, "access": {"admin": {"namespaces": ["monitoring"]}}}
        assert "access.admin.namespaces" not in notes(chart, opened)
