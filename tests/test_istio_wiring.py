"""The chart's and istio/'s Istio wiring: which gateways our objects reach (issue 11 item 6),
and the tcp_proxy patch gated to the proxies that understand it (item 5)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from authz.render import (
    DEFAULT_GATEWAY_SELECTOR,
    GATEWAY_LABEL,
    RenderOptions,
    parse_selector,
    render,
)

ROOT = Path(__file__).resolve().parent.parent
ISTIO_DIR = ROOT / "istio"


def chart_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(ROOT / "charts" / "egress-authz") as chart:
        manifests = chart.render(name="egress-authz", namespace="egress-authz",
                                 values=values or {})
    return [doc for path, text in manifests.items() if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def objects() -> Iterator[list[dict[str, Any]]]:
    yield chart_objects()


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [obj] = [o for o in objs if o["kind"] == kind]
    return obj


def custom_policy(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The gateway's CUSTOM AuthorizationPolicy (the chart also fences the service's own pods)."""
    [obj] = [o for o in objs
             if o["kind"] == "AuthorizationPolicy" and o["spec"].get("action") == "CUSTOM"]
    return obj


def serve_args(objs: list[dict[str, Any]]) -> list[str]:
    deployment = one(objs, "Deployment")
    return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])


class TestGatewaySelector:
    """Item 6: our Gateways, AuthorizationPolicy and EnvoyFilter reach our gateway only."""

    def test_selector_has_a_label_only_our_gateway_has(self, objects: list[dict[str, Any]]
                                                       ) -> None:
        """Every selector in the chart and the service's Gateway carry egress-authz.io/gateway;
        a stock `istio: egressgateway` pod in another namespace matches none of them."""
        stock = {"istio": "egressgateway", "app": "istio-egressgateway"}
        selectors = [one(objects, "Gateway")["spec"]["selector"],
                     custom_policy(objects)["spec"]["selector"]["matchLabels"],
                     one(objects, "EnvoyFilter")["spec"]["workloadSelector"]["labels"]]
        from authz.loader import build_policy_set, load_path

        written = render(build_policy_set(load_path(ISTIO_DIR / "examples").policies))
        selectors += [o["spec"]["selector"] for o in written if o["kind"] == "Gateway"]
        for sel in selectors:
            assert sel == DEFAULT_GATEWAY_SELECTOR
            assert not sel.items() <= stock.items()

    def test_service_is_told_the_chart_selector(self) -> None:
        """--gateway-selector follows istio.gatewaySelector, so the hosts Gateway the service
        writes selects the same pods as the chart's objects."""
        from authz.commands.serve import build_arg_parser

        objs = chart_objects({"istio": {"gatewaySelector": {"app": "my-egress", "tier": "x"}}})
        args = serve_args(objs)
        value = args[args.index("--gateway-selector") + 1]
        parsed = parse_selector(build_arg_parser().parse_args(
            ["--gateway-selector", value]).gateway_selector)
        assert parsed == {"app": "my-egress", "tier": "x"}
        assert one(objs, "Gateway")["spec"]["selector"] == parsed
        default = serve_args(chart_objects())
        assert parse_selector(build_arg_parser().parse_args(
            ["--gateway-selector", default[default.index("--gateway-selector") + 1]]
        ).gateway_selector) == DEFAULT_GATEWAY_SELECTOR == dict(RenderOptions().gateway_selector)

    def test_bad_selector_flag_is_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A malformed --gateway-selector is a usage error, not a crash later."""
        from authz.commands.serve import build_arg_parser

        with pytest.raises(SystemExit):
            build_arg_parser().parse_args(["--gateway-selector", "noequals"])
        assert "not key=value" in capsys.readouterr().err

    def test_istio_installs_label_the_gateway(self) -> None:
        """istioctl and Helm flavours give the gateway pods the label; istiod scopes gateways
        to their namespace."""
        [operator] = [d for d in yaml.safe_load_all((ISTIO_DIR / "mesh-config.yaml").read_text())
                      if d]
        [gw] = operator["spec"]["components"]["egressGateways"]
        assert gw["label"].items() >= DEFAULT_GATEWAY_SELECTOR.items()
        helm_values = yaml.safe_load((ISTIO_DIR / "egress-gateway-values.yaml").read_text())
        assert helm_values["labels"][GATEWAY_LABEL] == DEFAULT_GATEWAY_SELECTOR[GATEWAY_LABEL]
        istiod = yaml.safe_load((ISTIO_DIR / "istiod-values.yaml").read_text())
        for env in (operator["spec"]["values"]["pilot"]["env"], istiod["pilot"]["env"]):
            assert env["PILOT_SCOPE_GATEWAY_TO_NAMESPACE"] == "true"


# Istio versions as the proxies report them (node metadata ISTIO_VERSION).
OLD = ["1.22.0", "1.26.3", "1.28.0", "1.28.9-distroless", "1.2.0", "1.9.9", "0.8.0", "",
       "1.10.0", "1.19.3", "1.20.0", "1.3.0", "1.28"]
NEW = ["1.29.0", "1.29.1", "1.29-dev", "1.30.0", "1.45.2", "1.100.0", "2.0.0", "10.1.0"]


class TestConnectOnDataPatch:
    """Item 5: upstream_connect_mode reaches only proxies with Envoy >= 1.37 (Istio >= 1.29)."""

    def patches(self, objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for p in one(objects, "EnvoyFilter")["spec"]["configPatches"]:
            f = p["match"]["listener"]["filterChain"]["filter"]
            out[f.get("subFilter", {}).get("name", f["name"])] = p
        return out

    def test_tcp_proxy_patch_is_version_gated(self, objects: list[dict[str, Any]]) -> None:
        """The tcp_proxy patch matches Istio 1.29+ and nothing older; istiod matches the regex
        unanchored against ISTIO_VERSION (pilot/pkg/model/envoyfilter.go), and an empty
        version never matches."""
        patch = self.patches(objects)["envoy.filters.network.tcp_proxy"]
        assert patch["patch"]["value"]["typed_config"]["upstream_connect_mode"] == (
            "ON_DOWNSTREAM_DATA")
        regex = re.compile(patch["match"]["proxy"]["proxyVersion"])
        assert [v for v in NEW if not regex.search(v)] == []
        assert [v for v in OLD if v and regex.search(v)] == []

    def test_ext_authz_patches_apply_to_every_version(self, objects: list[dict[str, Any]]
                                                      ) -> None:
        """The SNI / peer certificate flags exist in every supported Envoy: never gated."""
        patches = self.patches(objects)
        for name in ("envoy.filters.network.ext_authz", "envoy.filters.http.ext_authz"):
            assert "proxy" not in patches[name]["match"]


class TestServeKubeSelector:
    def test_writer_gets_the_flag(self, tmp_path: Path) -> None:
        """`serve --kube --gateway-selector` reaches the registry writer's render options."""
        from authz.commands.serve import build_arg_parser
        from authz.kube.controller import KubeController
        from authz.workloads import WorkloadIndex
        from tests.kube_harness import write_kubeconfig

        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
        args = build_arg_parser().parse_args([
            "--kube", "--kubeconfig", str(kubeconfig), "--namespace", "egress-authz",
            "--gateway-selector", "app=edge,egress-authz.io/gateway=blue"])
        controller = KubeController.from_args(args, WorkloadIndex())
        assert controller.writer is not None
        assert controller.writer.options.gateway_selector == {
            "app": "edge", "egress-authz.io/gateway": "blue"}
