"""The Helm chart, rendered by real Helm (helm-python-sdk) and validated.

Every variant is rendered offline; every Kubernetes object is checked against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are
errors) for the oldest and newest Kubernetes the chart supports, and every
Istio object against the Istio CRD schemas (tests/schemas.py).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import referencing
import yaml
from kubernetes_validate import utils as kube_validate

from tests.schemas import is_istio, requires_istio_schemas, validate_istio

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "egress-authz"
RELEASE = "egress-authz"
NAMESPACE = "egress-authz"
# Oldest (Chart.yaml kubeVersion) and newest Kubernetes the chart is checked against;
# both ship offline inside kubernetes-validate.
KUBE_VERSIONS = ("1.27.0", "1.37.0")
# The default egress gateway selector: Istio's label plus one only our gateway has.
GATEWAY_SELECTOR = {"istio": "egressgateway", "egress-authz.io/gateway": "egress-authz"}

# Values variants the chart must render cleanly. Each is (id, values, namespace).
VARIANTS: list[tuple[str, dict[str, Any], str]] = [
    ("default", {}, NAMESPACE),
    ("hpa", {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9}}, NAMESPACE),
    (
        "servicemonitor",
        {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}},
         "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
         "grafanaDashboard": {"enabled": True}},
        NAMESPACE,
    ),
    ("istio-off", {"istio": {"enabled": False}}, NAMESPACE),
    (
        "custom-namespace",
        {"gatewayNamespace": "edge-out", "trustDomain": "corp.example"},
        "platform-egress",
    ),
    (
        "everything-on",
        {
            "autoscaling": {"enabled": True},
            "serviceMonitor": {"enabled": True},
            "networkPolicy": {
                "enabled": True,
                "namespaces": ["shop", "billing"],
                "extraEgress": [
                    {
                        "to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
                        "ports": [{"protocol": "TCP", "port": 443}],
                    }
                ],
            },
            "clusterPolicy": {"enabled": True, "policy": {"deny": ["api.stealyourmoney.com"]}},
            "namespaceSelector": "egress-authz.io/enabled=true",
            "workers": 8,
            "writeIstioRegistry": False,
            "podAntiAffinity": "hard",
            "env": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4317"}],
        },
        NAMESPACE,
    ),
    ("single-replica", {"replicaCount": 1, "podAntiAffinity": ""}, NAMESPACE),
]

_DURATION = "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
# The subset of the Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1)
# the chart uses; kubernetes-validate has no schema for third-party CRDs.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": {"type": "object"}},
                    "additionalProperties": False,
                },
                "namespaceSelector": {
                    "type": "object",
                    "properties": {
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                        "any": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(
    chart: helm.Chart, values: dict[str, Any] | None = None, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every object the chart renders (NOTES.txt excluded), as fresh dicts."""
    key = (id(chart), json.dumps(values or {}, sort_keys=True), namespace)
    if key not in _RENDERED:
        manifests = chart.render(
            values=values or {}, name=RELEASE, namespace=namespace, is_install=True
        )
        objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    assert isinstance(doc, dict), f"{path}: not a mapping"
                    objects.append(doc)
        _RENDERED[key] = json.dumps(objects)
    result: list[dict[str, Any]] = json.loads(_RENDERED[key])  # a copy tests may change
    return result


_RENDERED: dict[tuple[int, str, str], str] = {}


def kube_validate_strict(obj: dict[str, Any], version: str) -> None:
    """kubernetes-validate's strict check, with its schemas loaded once per kind.

    Same schema files and validator as `kubernetes_validate.validate`, which
    re-reads the 1.2 MB definitions file on every call.
    """
    validator = _kube_validator(version, obj["kind"], obj["apiVersion"])
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        path = ".".join(str(p) for p in error.absolute_path)
        raise AssertionError(f"{name_of(obj)} invalid on {version}: {path}: {error.message}")


@functools.cache
def _kube_validator(version: str, kind: str, api_version: str) -> Any:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    directory = f"kubernetes-json-schema/v{version}-local-strict"
    schema = kube_validate.schema_contents(
        f"{directory}/{kind.lower()}-{group_version}.json", version
    )
    definitions = kube_validate.schema_contents(f"{directory}/_definitions.json", version)
    registry: referencing.Registry = (
        referencing.Resource.from_contents(schema) @ referencing.Registry()
    )
    registry = referencing.Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def notes(chart: helm.Chart, values: dict[str, Any] | None = None) -> str:
    manifests = chart.render(values=values or {}, name=RELEASE, namespace=NAMESPACE)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def by_kind(
    objects: list[dict[str, Any]], kind: str, *, app_namespaces: bool = False
) -> list[dict[str, Any]]:
    """Objects of `kind`; app_namespaces: only those outside the release namespace."""
    return [
        o for o in objects
        if o["kind"] == kind
        and not (app_namespaces and o["metadata"].get("namespace") == NAMESPACE)
    ]


def in_gateway_namespace(
    objects: list[dict[str, Any]], namespace: str = "istio-egress"
) -> list[dict[str, Any]]:
    """The Istio objects wiring the gateway (the release's own access objects excluded)."""
    return [o for o in objects if is_istio(o) and o["metadata"].get("namespace") == namespace]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    result: dict[str, Any] = pod["containers"][0]
    return result


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '-')}/{obj['metadata']['name']}"


class TestRenderAndValidate:
    """Every variant renders, and every object it renders is valid."""

    @pytest.mark.parametrize(
        ("variant", "values", "namespace"), VARIANTS, ids=[v[0] for v in VARIANTS]
    )
    def test_kubernetes_objects_validate(
        self, chart: helm.Chart, variant: str, values: dict[str, Any], namespace: str
    ) -> None:
        """Kubernetes objects pass strict OpenAPI validation, oldest and newest version."""
        objects = render(chart, values, namespace)
        checked = 0
        for obj in objects:
            if is_istio(obj) or obj["apiVersion"].startswith("monitoring.coreos.com/"):
                continue
            for version in KUBE_VERSIONS:
                kube_validate_strict(obj, version)
            checked += 1
        assert checked >= 7  # ServiceAccount, Service, Deployment, RBAC x4, ...

    @pytest.mark.parametrize(
        ("change", "where"),
        [
            (lambda d: d["spec"].update(replcas=2), "spec: .*'replcas' was unexpected"),
            (lambda d: d["spec"].update(replicas="two"), "spec.replicas: 'two'"),
            (
                lambda d: d["spec"]["template"]["spec"].pop("containers"),
                "spec.template.spec: 'containers' is a required",
            ),
        ],
        ids=["unknown-field", "wrong-type", "missing-required"],
    )
    def test_validator_catches_mistakes(self, chart: helm.Chart, change: Any, where: str) -> None:
        """The strict Kubernetes check refuses unknown fields, wrong types, missing fields."""
        deployment = one(render(chart), "Deployment")
        change(deployment)
        with pytest.raises(AssertionError, match=f"invalid on {KUBE_VERSIONS[0]}: {where}"):
            kube_validate_strict(deployment, KUBE_VERSIONS[0])

    @requires_istio_schemas
    @pytest.mark.parametrize(
        ("variant", "values", "namespace"), VARIANTS, ids=[v[0] for v in VARIANTS]
    )
    def test_istio_objects_validate(
        self, chart: helm.Chart, variant: str, values: dict[str, Any], namespace: str
    ) -> None:
        """Istio objects pass the Istio CRD schemas, unknown fields refused."""
        for obj in render(chart, values, namespace):
            if is_istio(obj):
                validate_istio(obj)

    def test_service_monitor_validates(self, chart: helm.Chart) -> None:
        """The ServiceMonitor has only Prometheus Operator fields and scrapes the admin port."""
        objects = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}})
        monitor = one(objects, "ServiceMonitor")
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
        service = one(objects, "Service")
        admin = next(
            p
            for p in service["spec"]["ports"]
            if p["name"] == monitor["spec"]["endpoints"][0]["port"]
        )
        assert admin["port"] == 9090
        assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "kps"
        assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]

    @pytest.mark.parametrize("variant", [v[0] for v in VARIANTS])
    def test_lint_clean(self, variant: str) -> None:
        """`helm lint --strict` reports no warning or error for any variant."""
        values = next(v[1] for v in VARIANTS if v[0] == variant)
        namespace = next(v[2] for v in VARIANTS if v[0] == variant)
        report = helm.lint(
            CHART_DIR, values, strict=True, namespace=namespace, kube_version="v1.30.0"
        )
        findings = [m for m in report["messages"] if m["severity"] >= 2]
        assert not findings, findings
        assert not report["errors"], report["errors"]

    def test_variants_cover_every_template(self, chart: helm.Chart) -> None:
        """Each template renders an object in at least one variant, so each is validated above."""
        covered: set[str] = set()
        for _, values, namespace in VARIANTS:
            manifests = chart.render(values=values, name=RELEASE, namespace=namespace)
            covered |= {
                path.rsplit("/", 1)[-1]
                for path, text in manifests.items()
                if path.endswith(".yaml") and any(doc for doc in yaml.safe_load_all(text))
            }
        templates = {p.name for p in (CHART_DIR / "templates").glob("*.yaml")}
        assert templates - covered == set()

    def test_every_object_is_namespaced_explicitly(self, chart: helm.Chart) -> None:
        """Namespaced objects name their namespace: `helm template | kubectl apply` works."""
        cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
        objects = render(chart, VARIANTS[5][1], "platform")
        for obj in objects:
            if obj["kind"] in cluster_scoped:
                assert "namespace" not in obj["metadata"]
            else:
                assert obj["metadata"].get("namespace"), name_of(obj)


class TestDeployment:
    """The Deployment is hardened and runs the service as documented."""

    def test_defaults(self, chart: helm.Chart) -> None:
        """Two replicas, spread over nodes, with requests and limits."""
        objects = render(chart)
        deployment = one(objects, "Deployment")
        assert deployment["spec"]["replicas"] == 2
        pod = deployment["spec"]["template"]["spec"]
        anti = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert anti[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        resources = container(objects)["resources"]
        assert set(resources) == {"requests", "limits"}
        assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"])

    def test_security_context(self, chart: helm.Chart) -> None:
        """Non-root, read-only root, no escalation, RuntimeDefault seccomp, no capabilities."""
        objects = render(chart)
        pod = one(objects, "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        sc = container(objects)["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc.get("privileged", False) is False
        # A read-only root needs a writable /tmp for Python and gRPC.
        assert {"name": "tmp", "mountPath": "/tmp"} in container(objects)["volumeMounts"]

    def test_probes_use_admin_port(self, chart: helm.Chart) -> None:
        """Liveness is /healthz and readiness /readyz, both on the admin port."""
        c = container(render(chart))
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": 9000, "admin": 9090}
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}

    def test_args(self, chart: helm.Chart) -> None:
        """The documented in-cluster command line, with the release namespace."""
        args = container(render(chart, namespace="platform-egress"))["args"]
        assert args == [
            "serve",
            "--kube",
            "--grpc-address",
            "0.0.0.0:9000",
            "--admin-address",
            "0.0.0.0:9090",
            "--trust-domain",
            "cluster.local",
            "--cluster-domain",
            "cluster.local",
            "--namespace",
            "platform-egress",
            "--gateway-namespace",
            "istio-egress",
            "--gateway-selector",
            "egress-authz.io/gateway=egress-authz,istio=egressgateway",
            "--fence-dns-namespace",
            "kube-system",
            "--fence-dns-labels",
            "k8s-app=kube-dns",
            "--fence-istiod-namespace",
            "istio-system",
            "--fence-cluster-pods",
            "--gateway-service",
            "istio-egressgateway",
            "--shutdown-delay",
            "5",
            "--shutdown-grace",
            "5",
            "--separate-admin",
        ]

    def test_separate_admin_by_default(self, chart: helm.Chart) -> None:
        """The chart serves admin from its own process (readers never take the Check
        process's interpreter); separateAdmin: false puts it back in the Check process."""
        assert "--separate-admin" in container(render(chart))["args"]
        assert "--separate-admin" not in container(render(chart, {"separateAdmin": False}))[
            "args"]

    def test_optional_args(self, chart: helm.Chart) -> None:
        """namespaceSelector and workers become flags only when set."""
        args = container(render(chart, {"namespaceSelector": "team in (a,b)", "workers": 4}))[
            "args"
        ]
        assert args[args.index("--namespace-selector") + 1] == "team in (a,b)"
        assert args[args.index("--workers") + 1] == "4"
        assert "--no-write" not in args
        assert "--no-write" in container(render(chart, {"writeIstioRegistry": False}))["args"]

    def test_gateway_port_map(self, chart: helm.Chart) -> None:
        """gatewayPortMap replaces the gateway Service watch with a fixed map; the schema
        refuses a malformed one before anything is applied."""
        args = container(render(chart, {"gatewayPortMap": "8443:443,8080:80"}))["args"]
        assert args[args.index("--gateway-port-map") + 1] == "8443:443,8080:80"
        assert "--gateway-service" not in args
        from authz import cli

        assert cli.build_parser().parse_args(args).gateway_port_map == "8080:80,8443:443"
        args = container(render(chart, {"gatewayService": "egress-gw"}))["args"]
        assert args[args.index("--gateway-service") + 1] == "egress-gw"
        with pytest.raises(helm.HelmError, match="gatewayPortMap"):
            chart.render(values={"gatewayPortMap": "8443=443"}, name=RELEASE, namespace=NAMESPACE)

    def test_cluster_domain(self, chart: helm.Chart) -> None:
        """clusterDomain becomes `--cluster-domain`, which serve parses; the schema
        refuses a value that is no domain before anything is applied."""
        args = container(render(chart, {"clusterDomain": "k8s.corp.example"}))["args"]
        assert args[args.index("--cluster-domain") + 1] == "k8s.corp.example"
        from authz import cli

        assert cli.build_parser().parse_args(args).cluster_domain == "k8s.corp.example"
        with pytest.raises(helm.HelmError, match="clusterDomain"):
            chart.render(values={"clusterDomain": "*.example"}, name=RELEASE, namespace=NAMESPACE)

    def test_unknown_workloads_opt_out(self, chart: helm.Chart) -> None:
        """unknownWorkloads: allow becomes `--unknown-workloads allow`, which serve parses;
        the default (deny, serve's own default) adds no flag; other values fail the schema."""
        from authz.commands import serve

        args = container(render(chart, {"unknownWorkloads": "allow"}))["args"]
        assert args[args.index("--unknown-workloads") + 1] == "allow"
        assert serve.build_arg_parser().parse_args(args[1:]).unknown_workloads == "allow"
        default = container(render(chart))["args"]
        assert "--unknown-workloads" not in default
        assert serve.build_arg_parser().parse_args(default[1:]).unknown_workloads == "deny"
        with pytest.raises(helm.HelmError, match="unknownWorkloads"):
            chart.validate_schema({"unknownWorkloads": "yes"})

    def test_serve_accepts_args(self, chart: helm.Chart) -> None:
        """`egress-authz serve` parses the Deployment's args in every variant (dry parse)."""
        from authz import cli  # the parser the console script itself uses

        rejected = []
        for variant, values, namespace in VARIANTS:
            args = container(render(chart, values, namespace))["args"]
            stderr = io.StringIO()
            try:
                with contextlib.redirect_stderr(stderr):
                    parsed = cli.build_parser().parse_args(args)
            except SystemExit:
                rejected.append(f"[{variant}] egress-authz {' '.join(args)}\n{stderr.getvalue()}")
                continue
            assert isinstance(parsed, argparse.Namespace)
            assert parsed.command == "serve"
        assert not rejected, "\n".join(rejected)

    def test_shutdown_fits_grace_period(self, chart: helm.Chart) -> None:
        """Delay plus grace must end before Kubernetes kills the pod; otherwise the render fails."""
        pod = one(render(chart), "Deployment")["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] > 5 + 5
        too_long = {"shutdown": {"delaySeconds": 20, "graceSeconds": 10}}
        with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds must exceed"):
            chart.render(values=too_long, name=RELEASE, namespace=NAMESPACE)

    def test_hpa_replaces_replicas(self, chart: helm.Chart) -> None:
        """With autoscaling the Deployment leaves replicas to the HPA, which targets it."""
        objects = render(
            chart, {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9}}
        )
        deployment = one(objects, "Deployment")
        assert "replicas" not in deployment["spec"]
        hpa = one(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)

    def test_pdb_only_with_spare_replicas(self, chart: helm.Chart) -> None:
        """A PDB with one replica would block every node drain, so it is not rendered."""
        assert one(render(chart), "PodDisruptionBudget")["spec"]["minAvailable"] == 1
        assert not by_kind(render(chart, {"replicaCount": 1}), "PodDisruptionBudget")
        autoscaled = {"replicaCount": 1, "autoscaling": {"enabled": True, "minReplicas": 2}}
        assert by_kind(render(chart, autoscaled), "PodDisruptionBudget")
        autoscaled["autoscaling"]["minReplicas"] = 1
        assert not by_kind(render(chart, autoscaled), "PodDisruptionBudget")


class TestService:
    """Service: gRPC for the gateway, admin inside the cluster only."""

    def test_ports(self, chart: helm.Chart) -> None:
        """gRPC carries appProtocol grpc (Istio then speaks HTTP/2); the Service is ClusterIP."""
        objects = render(chart)
        service = one(objects, "Service")
        assert service["spec"]["type"] == "ClusterIP"
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        assert ports["grpc"]["port"] == 9000 and ports["grpc"]["appProtocol"] == "grpc"
        assert ports["http-admin"]["port"] == 9090
        selector = service["spec"]["selector"]
        labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()

    def test_no_external_exposure(self, chart: helm.Chart) -> None:
        """values.schema.json refuses NodePort/LoadBalancer for the admin and gRPC ports."""
        with pytest.raises(helm.HelmError):
            chart.render(
                values={"service": {"type": "LoadBalancer"}}, name=RELEASE, namespace=NAMESPACE
            )


class TestIstioObjects:
    """The chart's Istio objects wire the egress gateway to this service."""

    def test_authorization_policy(self, chart: helm.Chart) -> None:
        """CUSTOM action, egress-authz provider, on the egress gateway, for every request."""
        policy = one(in_gateway_namespace(render(chart)), "AuthorizationPolicy")
        assert policy["metadata"]["namespace"] == "istio-egress"
        assert policy["spec"] == {
            "selector": {"matchLabels": GATEWAY_SELECTOR},
            "action": "CUSTOM",
            "provider": {"name": "egress-authz"},
            "rules": [{}],  # no rules would match nothing; one empty rule matches everything
        }

    def test_gateway(self, chart: helm.Chart) -> None:
        """The catch-all Gateway takes sidecars' Istio mTLS around plain HTTP on port 80."""
        gateway = one(render(chart), "Gateway")
        assert (gateway["metadata"]["name"], gateway["metadata"]["namespace"]) == (
            "egress-authz",
            "istio-egress",
        )
        assert gateway["spec"]["selector"] == GATEWAY_SELECTOR
        [server] = gateway["spec"]["servers"]
        assert server["port"]["number"] == 80 and server["port"]["protocol"] == "HTTPS"
        assert server["tls"] == {"mode": "ISTIO_MUTUAL"}
        assert server["hosts"] == ["*"]

    def test_gateway_matches_what_the_service_binds_to(self, chart: helm.Chart) -> None:
        """The VirtualServices egress-authz writes bind to this Gateway's name, port and pods."""
        from authz.render import RenderOptions

        options = RenderOptions()
        gateway = one(render(chart), "Gateway")
        assert gateway["metadata"]["name"] == options.gateway_name
        assert gateway["metadata"]["namespace"] == options.gateway_namespace
        assert gateway["spec"]["servers"][0]["port"]["number"] == options.gateway_http_port
        assert gateway["spec"]["selector"] == dict(options.gateway_selector)

    def test_envoy_filter(self, chart: helm.Chart) -> None:
        """Both gateway ext_authz filters send the TLS session (SNI) and peer certificate,
        and the gateway's tcp_proxy dials only after ext_authz let data through."""
        envoy_filter = one(render(chart), "EnvoyFilter")
        assert envoy_filter["spec"]["workloadSelector"] == {"labels": GATEWAY_SELECTOR}
        patches = envoy_filter["spec"]["configPatches"]
        assert {p["applyTo"] for p in patches} == {"NETWORK_FILTER", "HTTP_FILTER"}
        by_filter = {}
        for patch in patches:
            assert patch["match"]["context"] == "GATEWAY"
            assert patch["patch"]["operation"] == "MERGE"
            target = patch["match"]["listener"]["filterChain"]["filter"]
            by_filter[target.get("subFilter", {}).get("name", target["name"])] = (
                patch["patch"]["value"]["typed_config"])
        for name in ("envoy.filters.network.ext_authz", "envoy.filters.http.ext_authz"):
            assert by_filter[name]["include_tls_session"] is True
            assert by_filter[name]["include_peer_certificate"] is True
        tcp = by_filter["envoy.filters.network.tcp_proxy"]
        assert tcp["upstream_connect_mode"] == "ON_DOWNSTREAM_DATA"

    def test_custom_gateway_namespace_and_selector(self, chart: helm.Chart) -> None:
        """Istio objects follow gatewayNamespace and istio.gatewaySelector."""
        objects = render(
            chart,
            {"gatewayNamespace": "edge-out", "istio": {"gatewaySelector": {"app": "my-egress"}}},
        )
        for kind in ("AuthorizationPolicy", "Gateway", "EnvoyFilter"):
            assert one(in_gateway_namespace(objects, "edge-out"), kind)
        assert one(objects, "Gateway")["spec"]["selector"] == {"app": "my-egress"}
        assert "--gateway-namespace" in container(objects)["args"]
        args = container(objects)["args"]
        assert args[args.index("--gateway-namespace") + 1] == "edge-out"

    def test_istio_off(self, chart: helm.Chart) -> None:
        """istio.enabled=false renders no Istio object at all; each switch works alone too."""
        assert not [o for o in render(chart, {"istio": {"enabled": False}}) if is_istio(o)]
        for switch, kind in (
            ("gateway", "Gateway"),
            ("authorizationPolicy", "AuthorizationPolicy"),
            ("envoyFilter", "EnvoyFilter"),
        ):
            objects = render(chart, {"istio": {switch: {"enabled": False}}})
            assert not by_kind(in_gateway_namespace(objects), kind)
            assert len(in_gateway_namespace(objects)) == 2


class TestNetworkPolicy:
    """Application namespaces can be fenced so the gateway cannot be bypassed."""

    def test_off_by_default(self, chart: helm.Chart) -> None:
        """No NetworkPolicy unless asked for."""
        assert not by_kind(render(chart), "NetworkPolicy", app_namespaces=True)

    def test_one_per_namespace(self, chart: helm.Chart) -> None:
        """Each listed namespace gets an egress-only policy: DNS, gateway, istiod, cluster pods."""
        objects = render(
            chart, {"networkPolicy": {"enabled": True, "namespaces": ["shop", "billing"]}}
        )
        policies = by_kind(objects, "NetworkPolicy", app_namespaces=True)
        assert sorted(p["metadata"]["namespace"] for p in policies) == ["billing", "shop"]
        for policy in policies:
            spec = policy["spec"]
            assert spec["podSelector"] == {} and spec["policyTypes"] == ["Egress"]
            peers = [peer for rule in spec["egress"] for peer in rule["to"]]
            assert all("ipBlock" not in peer for peer in peers), "no address outside the cluster"
            dns = spec["egress"][0]
            assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
            gateway = spec["egress"][1]["to"][0]
            assert gateway["namespaceSelector"]["matchLabels"] == {
                "kubernetes.io/metadata.name": "istio-egress"
            }
            assert gateway["podSelector"]["matchLabels"] == GATEWAY_SELECTOR

    def test_strict_mode(self, chart: helm.Chart) -> None:
        """allowClusterPods=false leaves only DNS, the gateway and istiod."""
        objects = render(
            chart,
            {"networkPolicy": {"enabled": True, "namespaces": ["shop"], "allowClusterPods": False}},
        )
        spec = one(by_kind(objects, "NetworkPolicy", app_namespaces=True), "NetworkPolicy")["spec"]
        assert len(spec["egress"]) == 3
        assert {"namespaceSelector": {}} not in [peer for r in spec["egress"] for peer in r["to"]]


class TestClusterPolicy:
    """The optional cluster-tier policy ConfigMap."""

    def test_rendered_policy_loads(self, chart: helm.Chart, tmp_path: Path) -> None:
        """The ConfigMap carries both labels and a policy.yaml the service's loader accepts."""
        from authz.loader import load_path

        objects = render(
            chart,
            {"clusterPolicy": {"enabled": True, "policy": {"deny": ["api.stealyourmoney.com"]}}},
        )
        configmap = one(objects, "ConfigMap")
        assert configmap["metadata"]["labels"]["egress-authz.io/tier"] == "cluster"
        assert configmap["metadata"]["labels"]["egress-authz.io/policy"] == "true"
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(configmap))
        result = load_path(tmp_path, cluster_namespace=NAMESPACE)
        assert not result.problems, result.problems
        assert [p.deny for p in result.policies] == [("api.stealyourmoney.com",)]


class TestValuesSchema:
    """values.schema.json makes wrong values fail at install, before anything is applied."""

    @pytest.mark.parametrize(
        "values",
        [
            {"replicaCount": "two"},
            {"replicaCount": 0},
            {"image": {"pullPolicy": "Sometimes"}},
            {"ports": {"grpc": 70000}},
            {"istio": {"enabled": "yes"}},
            {"networkPolicy": {"namespaces": ["Not_A_Namespace"]}},
            {"podAntiAffinity": "strong"},
            {"serviceMonitor": {"interval": "often"}},
            {"replicaCuont": 3},  # typo of a top-level key
        ],
        ids=lambda v: json.dumps(v),
    )
    def test_rejects(self, chart: helm.Chart, values: dict[str, Any]) -> None:
        """Helm refuses to render (and so to install) with a wrong value, naming it."""
        with pytest.raises(helm.HelmError) as caught:
            chart.validate_schema(values)
        key = next(iter(values))
        assert key in str(caught.value)
        with pytest.raises(helm.HelmError):
            chart.render(values=values, name=RELEASE, namespace=NAMESPACE)

    def test_accepts_every_variant(self, chart: helm.Chart) -> None:
        """The tested variants are valid values."""
        for _, values, _ in VARIANTS:
            chart.validate_schema(values)

    def test_schema_covers_every_default(self, chart: helm.Chart) -> None:
        """Every key in values.yaml is described by the schema (it refuses unknown keys)."""
        schema = json.loads((CHART_DIR / "values.schema.json").read_text())
        jsonschema.Draft7Validator.check_schema(schema)
        jsonschema.validate(chart.values, schema)


class TestNotes:
    """NOTES.txt tells the user what to do next."""

    def test_next_steps(self, chart: helm.Chart) -> None:
        """It gives the mesh config for this release's service, and the traces command."""
        text = notes(chart)
        assert "service: egress-authz.egress-authz.svc.cluster.local" in text
        assert "port: 9000" in text
        assert "failOpen: false" in text
        assert "REGISTRY_ONLY" in text
        assert "egress-authz traces" in text
        assert "helm rollback" in text

    def test_warns_when_istio_objects_are_off(self, chart: helm.Chart) -> None:
        """With istio.enabled=false it says what the user must create instead."""
        assert "create the Gateway" in notes(chart, {"istio": {"enabled": False}})


class TestDockerfile:
    """The image the chart runs (Docker cannot run here: checked statically)."""

    TEXT = (ROOT / "Dockerfile").read_text()

    def instructions(self, name: str) -> list[str]:
        lines = self.TEXT.replace("\\\n", " ").splitlines()
        return [line.split(None, 1)[1] for line in lines if line.startswith(name + " ")]

    def test_base_and_entrypoint(self) -> None:
        """python:3.11-slim, and the console script as ENTRYPOINT (the chart passes only args)."""
        assert all(f.startswith("python:3.11-slim") for f in self.instructions("FROM"))
        assert json.loads(self.instructions("ENTRYPOINT")[-1]) == ["egress-authz"]

    def test_user_matches_chart(self, chart: helm.Chart) -> None:
        """The image's numeric non-root user is the one the chart's pod runs as."""
        pod = one(render(chart), "Deployment")["spec"]["template"]["spec"]
        uid, gid = self.instructions("USER")[-1].split(":")
        assert int(uid) == pod["securityContext"]["runAsUser"] != 0
        assert int(gid) == pod["securityContext"]["runAsGroup"]

    def test_exposed_ports_match_chart(self, chart: helm.Chart) -> None:
        """EXPOSE lists the chart's gRPC and admin ports."""
        ports = {p["containerPort"] for p in container(render(chart))["ports"]}
        assert {int(p) for p in self.instructions("EXPOSE")[-1].split()} == ports

    def test_installs_pinned_runtime_dependencies(self) -> None:
        """Runtime dependencies come from pyproject.toml, pinned by requirements.lock."""
        assert "-c requirements.lock" in self.TEXT
        assert "['project']['dependencies']" in self.TEXT

    def test_copied_files_exist(self) -> None:
        """Every file the build COPYs from the context is in the repository."""
        for args in self.instructions("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _dest = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


class TestInstallGuide:
    """docs/install.md stays true to the chart and the repository."""

    TEXT = (ROOT / "docs" / "install.md").read_text()

    def test_every_set_flag_is_a_valid_value(self, chart: helm.Chart) -> None:
        """Each `--set`/`--set-json` in the guide passes values.schema.json and renders."""
        flags = re.findall(r"--set(-json)? '?([A-Za-z][\w.]*=[^'\s`]+)'?", self.TEXT)
        assert len(flags) >= 6
        for is_json, assignment in flags:
            if assignment.endswith("=..."):
                continue  # a placeholder for the reader's own value
            parse = helm.parse_set_json if is_json else helm.parse_set_string
            values = parse(assignment)
            chart.validate_schema(values)
            render(chart, values)

    def test_value_table_names_real_values(self, chart: helm.Chart) -> None:
        """Every value in the guide's table exists in values.yaml."""
        defaults = chart.values
        table = self.TEXT.split("Values you are most likely to set:", 1)[1].split("\n\n", 2)[1]
        keys = re.findall(r"^\| `([\w.]+)`", table, flags=re.MULTILINE)
        assert "replicaCount" in keys
        for key in keys:
            node: Any = defaults
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"docs name unknown value {key}"
                node = node[part]

    def test_referenced_files_exist(self) -> None:
        """Every repository path the guide points at exists."""
        # Files (with an extension) and the chart; `istio/gateway` etc. are Istio's Helm charts.
        paths = set(re.findall(r"(?<![\w/])((?:istio|charts|docs)/[\w/-]+\.\w+)", self.TEXT))
        paths |= set(re.findall(r"(?<![\w/])(charts/egress-authz)\b", self.TEXT))
        assert "istio/mesh-config.yaml" in paths
        for path in paths:
            assert (ROOT / path).exists(), path


class TestPackage:
    """`helm package` produces an archive that installs the same objects."""

    def test_package_renders_like_the_directory(self, chart: helm.Chart, tmp_path: Path) -> None:
        """The .tgz holds every template and the schema; its default render equals the tree's."""
        archive = helm.package(CHART_DIR, destination=tmp_path)
        assert Path(archive).name == "egress-authz-0.1.0.tgz"
        with helm.Chart.load(archive) as packaged:
            assert packaged.schema == chart.schema
            assert render(packaged) == render(chart)
