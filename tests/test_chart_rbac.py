"""The chart's RBAC grants exactly the API calls the code makes, no more, no less.

The expected rules come from `authz.kube.permissions`, the table the
Kubernetes code is written against, so the chart and the code cannot drift:
adding an API call to the code without the chart (or a rule to the chart
without the code) fails here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "egress-authz"
RELEASE = "egress-authz"

Grant = tuple[str, str, str, tuple[str, ...]]  # (api group, resource, verb, resourceNames)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(
    chart: helm.Chart, namespace: str, values: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    manifests = chart.render(values=values or {}, name=RELEASE, namespace=namespace)
    return [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def grants(rules: Iterable[dict[str, Any]]) -> set[Grant]:
    """Expand RBAC rules into (group, resource, verb) triples."""
    out: set[Grant] = set()
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    out.add((group, resource, verb, tuple(sorted(rule.get("resourceNames", [])))))
    return out


def expected_grants() -> tuple[set[Grant], set[Grant]]:
    """(cluster-wide, own-namespace) grants from the code's permissions table."""
    from authz.kube.permissions import Scope

    return scope_grants(Scope.CLUSTER), scope_grants(Scope.SERVICE_NAMESPACE)


def scope_grants(scope: Any) -> set[Grant]:
    """The table's grants of one Scope."""
    from authz.kube.permissions import PERMISSIONS

    return {(p.group, p.resource, verb, tuple(sorted(p.names))) for p in PERMISSIONS
            if p.scope is scope for verb in p.verbs}


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


class TestRbac:
    """ClusterRole and Role against authz/kube/permissions.py."""

    @pytest.mark.parametrize("namespace", ["egress-authz", "platform-egress"])
    def test_cluster_role_equals_table(self, chart: helm.Chart, namespace: str) -> None:
        """The ClusterRole grants exactly the table's cluster-wide calls."""
        cluster, _ = expected_grants()
        role = one(render(chart, namespace), "ClusterRole")
        assert grants(role["rules"]) == cluster, (
            f"missing from chart: {sorted(cluster - grants(role['rules']))}; "
            f"not used by code: {sorted(grants(role['rules']) - cluster)}"
        )

    @pytest.mark.parametrize("namespace", ["egress-authz", "platform-egress"])
    def test_role_equals_table(self, chart: helm.Chart, namespace: str) -> None:
        """The Role (own namespace only) grants exactly the table's namespaced calls."""
        _, namespaced = expected_grants()
        objects = render(chart, namespace)
        role = one([o for o in objects if not o["metadata"]["name"].endswith(
            ("-gateway-ports", "-cli"))], "Role")
        assert role["metadata"]["namespace"] == namespace
        assert grants(role["rules"]) == namespaced, (
            f"missing from chart: {sorted(namespaced - grants(role['rules']))}; "
            f"not used by code: {sorted(grants(role['rules']) - namespaced)}"
        )

    @pytest.mark.parametrize("gateway_ns", ["istio-egress", "egress-authz"])
    def test_gateway_role_equals_table(self, chart: helm.Chart, gateway_ns: str) -> None:
        """The gateway-namespace Role grants exactly the table's gateway-namespace calls
        (the gateway Service, for the port map), bound to the service account; also when
        the gateway shares the release namespace (distinct names, no clash)."""
        from authz.kube.permissions import Scope

        objects = render(chart, "egress-authz", {"gatewayNamespace": gateway_ns})
        role = one([o for o in objects if o["metadata"]["name"].endswith("-gateway-ports")],
                   "Role")
        assert role["metadata"]["namespace"] == gateway_ns
        assert grants(role["rules"]) == scope_grants(Scope.GATEWAY_NAMESPACE) != set()
        binding = one([o for o in objects if o["metadata"]["name"].endswith("-gateway-ports")],
                      "RoleBinding")
        assert binding["metadata"]["namespace"] == gateway_ns
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": "egress-authz"}]
        names = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
                 for o in objects]
        assert len(names) == len(set(names))

    def test_no_wildcards(self, chart: helm.Chart) -> None:
        """No `*` in any group, resource, verb or name, and no nonResourceURLs."""
        for obj in render(chart, "egress-authz"):
            if obj["kind"] not in ("ClusterRole", "Role"):
                continue
            for rule in obj["rules"]:
                assert "nonResourceURLs" not in rule
                for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                    assert not any("*" in item for item in rule.get(key, [])), (obj["kind"], rule)

    def test_table_has_no_wildcards(self) -> None:
        """The table itself names every group, resource and verb."""
        cluster, namespaced = expected_grants()
        assert cluster and namespaced
        assert not any("*" in part for grant in cluster | namespaced for part in grant)

    @pytest.mark.parametrize("namespace", ["egress-authz", "platform-egress"])
    def test_bindings_point_at_the_service_account(self, chart: helm.Chart, namespace: str) -> None:
        """Both bindings bind the chart's roles to the Deployment's ServiceAccount, nothing else."""
        objects = render(chart, namespace)
        account = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
        assert one(objects, "ServiceAccount")["metadata"]["name"] == account
        objects = [o for o in objects if not o["metadata"]["name"].endswith("-gateway-ports")]
        for binding_kind, role_kind in (
            ("ClusterRoleBinding", "ClusterRole"),
            ("RoleBinding", "Role"),
        ):
            binding = one(objects, binding_kind)
            assert binding["roleRef"] == {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": role_kind,
                "name": one(objects, role_kind)["metadata"]["name"],
            }
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": account, "namespace": namespace}
            ]

    def test_rbac_off(self, chart: helm.Chart) -> None:
        """rbac.create=false renders no role or binding (for clusters that manage RBAC apart)."""
        kinds = {o["kind"] for o in render(chart, "egress-authz", {"rbac": {"create": False}})}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


class TestInstallGuideRbac:
    """The permissions table in docs/install.md is the code's table."""

    def test_docs_table_equals_code(self) -> None:
        """Each documented (scope, group, resource, verb) is granted by the code, and back."""
        text = (ROOT / "docs" / "install.md").read_text()
        table = text.split("| scope | API group | resources | verbs |", 1)[1].split("\n\n", 1)[0]
        from authz.kube.permissions import Scope

        cluster: set[Grant] = set()
        namespaced: set[Grant] = set()
        gateway: set[Grant] = set()
        for row in table.strip().splitlines()[1:]:
            scope, groups, resources, verbs = (c.strip() for c in row.strip("|").split("|"))
            target = {"cluster": cluster, "own namespace": namespaced,
                      "gateway namespace": gateway}[scope]
            for group in groups.split(", "):
                for resource in resources.split(", "):
                    resource, _, named = resource.partition(" named ")  # resourceNames
                    names = tuple(sorted(named.strip("`").split())) if named else ()
                    for verb in verbs.split(", "):
                        target.add(("" if group == "core" else group, resource, verb, names))
        assert (cluster, namespaced) == expected_grants()
        assert gateway == scope_grants(Scope.GATEWAY_NAMESPACE)


class TestCliRole:
    """The optional Role for `traces|explain|suggest|ui --kube` (rbac.cli)."""

    def test_off_by_default(self, chart: helm.Chart) -> None:
        """No -cli Role or binding unless asked for."""
        names = [o["metadata"]["name"] for o in render(chart, "egress-authz")]
        assert not any(n.endswith("-cli") for n in names)

    def test_grants_exactly_the_cli_table(self, chart: helm.Chart) -> None:
        """rbac.cli: a Role in the release namespace granting CLI_PERMISSIONS, bound to
        the subjects given."""
        from authz.kube.permissions import CLI_PERMISSIONS

        sre = {"kind": "Group", "name": "sre", "apiGroup": "rbac.authorization.k8s.io"}
        objects = render(chart, "platform-egress",
                         {"rbac": {"cli": {"create": True, "subjects": [sre]}}})  # fmt: skip
        role = one([o for o in objects if o["metadata"]["name"].endswith("-cli")], "Role")
        assert role["metadata"]["namespace"] == "platform-egress"
        want = {(p.group, p.resource, v, ()) for p in CLI_PERMISSIONS for v in p.verbs}
        assert grants(role["rules"]) == want
        binding = one([o for o in objects if o["metadata"]["name"].endswith("-cli")],
                      "RoleBinding")
        assert binding["roleRef"]["name"] == role["metadata"]["name"]
        assert binding["subjects"] == [sre]
