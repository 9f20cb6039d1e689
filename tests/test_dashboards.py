"""The chart's Grafana dashboard and PrometheusRule name only metrics `serve` exports.

Both are rendered from the chart as shipped; the metric names in every
PromQL expression are checked against the /metrics text of a real `serve`
process (after one Check, so that labelled series exist too).
"""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.test_server import (
    FINANCE_RULE,
    Client,
    check_request,
    free_port,
    policy_yaml,
    start_serve,
)

ROOT = Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "egress-authz"
METRIC = re.compile(r"\begress_authz_[a-z0-9_]+")
ON = {"prometheusRule": {"enabled": True}, "grafanaDashboard": {"enabled": True}}


@pytest.fixture(scope="module")
def rendered() -> Iterator[list[dict[str, Any]]]:
    with helm.Chart.load(CHART_DIR) as chart:
        manifests = chart.render(values=ON, name="egress-authz", namespace="egress-authz")
    yield [
        doc
        for path, text in manifests.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every metric and sample name in a running serve's /metrics."""
    policies = tmp_path_factory.mktemp("policies")
    (policies / "shop.yaml").write_text(policy_yaml(["api.kadath.io"], extra_rule=FINANCE_RULE))
    port, admin = free_port(), free_port()
    proc, _ = start_serve(policies, port, "--admin-address", f"127.0.0.1:{admin}")
    try:
        client = Client(port)
        client.check(check_request())
        client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    names = set()
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            name = line.split()[2]
            names.add(name)
            if line.startswith("# TYPE ") and line.endswith(" histogram"):
                names |= {name + s for s in ("_bucket", "_sum", "_count")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    assert "egress_authz_checks_total" in names  # the Check above was counted
    return names


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


class TestPrometheusRule:
    def test_off_by_default(self) -> None:
        """Like the ServiceMonitor, no PrometheusRule (Operator CRD) unless enabled."""
        with helm.Chart.load(CHART_DIR) as chart:
            manifests = chart.render(values={}, name="egress-authz", namespace="egress-authz")
        kinds = {
            d["kind"]
            for path, t in manifests.items()
            if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(t)
            if d
        }
        assert "PrometheusRule" not in kinds

    def test_every_metric_in_the_rules_is_exported(
        self, rendered: list[dict[str, Any]], exported: set[str]
    ) -> None:
        """Each alert's expression names only metrics /metrics really has."""
        rule = one(rendered, "PrometheusRule")
        alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
        assert {a["alert"] for a in alerts} >= {
            "EgressAuthzNoPolicyLoaded", "EgressAuthzPolicyInvalid",
            "EgressAuthzCheckLatencyHigh", "EgressAuthzSpansDropped",
            "EgressAuthzRegistryWriteErrors",
        }  # fmt: skip
        for a in alerts:
            used = set(METRIC.findall(a["expr"]))
            assert used, a["alert"]
            assert used <= exported, (a["alert"], sorted(used - exported))


class TestDashboard:
    def test_configmap_for_the_sidecar(self, rendered: list[dict[str, Any]]) -> None:
        """A ConfigMap labelled grafana_dashboard=1 holding one valid dashboard."""
        cms = [o for o in rendered if o["kind"] == "ConfigMap"
               and o["metadata"]["name"].endswith("-dashboard")]  # fmt: skip
        assert len(cms) == 1
        assert cms[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
        (text,) = cms[0]["data"].values()
        dash = json.loads(text)
        assert dash["uid"] == "egress-authz" and dash["panels"]

    def test_every_metric_in_the_panels_is_exported(
        self, rendered: list[dict[str, Any]], exported: set[str]
    ) -> None:
        """Each panel's queries name only metrics /metrics really has."""
        cm = next(o for o in rendered if o["metadata"]["name"].endswith("-dashboard"))
        dash = json.loads(next(iter(cm["data"].values())))
        for panel in dash["panels"]:
            for target in panel["targets"]:
                used = set(METRIC.findall(target["expr"]))
                assert used and used <= exported, (panel["title"], sorted(used - exported))
