"""Layer 3 (issue 11 item 7): the fence NetworkPolicy written into namespaces that opt in,
and the report of namespaces relying on a wildcard host with nothing fencing them."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from kubernetes_validate import utils as kube_validate

from authz.fence import FENCE_LABEL, FENCE_NAME, FenceOptions, fence_policy, is_fenced
from authz.kube.fence import REASON_UNFENCED, FenceMonitor
from authz.kube.writer import RegistryWriter
from authz.render import DEFAULT_GATEWAY_SELECTOR, RenderOptions
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import Replica, emu, policy_cm, replica, rule, write_kubeconfig

__all__ = ["emu", "replica"]  # fixtures
ROOT = Path(__file__).resolve().parent.parent
NP = ("networking.k8s.io/v1", "NetworkPolicy")
OPTIONS = FenceOptions(gateway_namespace="istio-egress",
                       gateway_selector=dict(DEFAULT_GATEWAY_SELECTOR))


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name,
                                                  **(labels or {})}}}


class TestFencePolicy:
    def test_valid_kubernetes_object(self) -> None:
        """The fence passes strict Kubernetes schema validation."""
        kube_validate.validate(fence_policy("shop", OPTIONS), "1.30.0", strict=True)

    def test_same_rules_as_the_chart_template(self) -> None:
        """The service's fence and the chart's per-namespace NetworkPolicy allow the same."""
        with helm.Chart.load(ROOT / "charts" / "egress-authz") as chart:
            manifests = chart.render(name="egress-authz", namespace="egress-authz", values={
                "networkPolicy": {"enabled": True, "namespaces": ["shop"]}})
        [chart_np] = [d for path, text in manifests.items() if not path.endswith("NOTES.txt")
                      for d in yaml.safe_load_all(text)
                      if d and d["kind"] == "NetworkPolicy" and d["metadata"]["namespace"] == "shop"]
        assert fence_policy("shop", OPTIONS)["spec"] == chart_np["spec"]

    def test_fence_counts_as_fenced(self) -> None:
        """What we write is what the report accepts as a fence."""
        assert is_fenced([fence_policy("shop", OPTIONS)])

    @pytest.mark.parametrize(("policies", "fenced"), [
        ([], False),
        ([{"spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}], False),
        ([{"spec": {"podSelector": {"matchLabels": {"a": "b"}}, "policyTypes": ["Egress"],
                    "egress": []}}], False),
        ([{"spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": []}}], True),
        ([{"spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": []}},
          {"spec": {"podSelector": {"matchLabels": {"a": "b"}}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}], False),
        ([{"spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]}}], False),
        ([{"spec": {"podSelector": {}, "policyTypes": ["Egress"],
                    "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}]}]}}], True),
        ([{"spec": {"podSelector": {}, "egress": []}}], True),  # policyTypes implied by egress
    ], ids=["none", "ingress-only", "some-pods", "deny-all", "another-opens-all",
            "rule-without-to", "narrow-ipblock", "implied-types"])
    def test_is_fenced(self, policies: list[dict[str, Any]], fenced: bool) -> None:
        """Every pod's egress restricted, and no rule in the namespace open to all addresses."""
        assert is_fenced(policies) is fenced


class TestLint:
    def lint(self, path: Path) -> list[str]:
        from authz import cli

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(["lint", str(path)]) == 0
        return [line for line in (out.getvalue() + err.getvalue()).splitlines()
                if line.startswith("warning:")]

    def test_lint_warns_about_unfenced_wildcards(self, tmp_path: Path) -> None:
        """`lint` names a namespace policy with a wildcard host when nothing under PATH
        fences its namespace; a labelled Namespace or a fencing NetworkPolicy silences it."""
        docs = [d for d in yaml.safe_load_all((ROOT / "examples" / "marketing.yaml").read_text())
                if d and d["kind"] == "ConfigMap"]
        (tmp_path / "marketing.yaml").write_text(yaml.safe_dump_all(docs))
        [warning] = self.lint(tmp_path)
        assert "marketing/egress-policy" in warning and "*.kadath.io" in warning
        assert FENCE_LABEL in warning
        (tmp_path / "fence.yaml").write_text(yaml.safe_dump(fence_policy("marketing", OPTIONS)))
        assert self.lint(tmp_path) == []
        (tmp_path / "fence.yaml").write_text(yaml.safe_dump(
            namespace("marketing", {FENCE_LABEL: "true"})))
        assert self.lint(tmp_path) == []
        (tmp_path / "fence.yaml").write_text(yaml.safe_dump(namespace("marketing")))
        assert len(self.lint(tmp_path)) == 1

    def test_examples_fence_their_wildcard_namespace(self) -> None:
        """examples/ opts marketing (a wildcard policy) in to the fence: lint is clean."""
        assert self.lint(ROOT / "examples") == []


@pytest.fixture
def running(emu: KubeEmulator, replica: Replica) -> Iterator[tuple[FenceMonitor, RegistryWriter]]:
    replica.start()
    monitor = FenceMonitor(replica.api(), replica.store, is_leader=lambda: True,
                           backoff_cap=0.5, watch_timeout=30, metrics=replica.metrics)
    writer = RegistryWriter(replica.api(), replica.store, options=RenderOptions(),
                            is_leader=lambda: True, backoff_cap=0.5, watch_timeout=30,
                            fences=monitor.opted_in, metrics=replica.metrics)
    monitor.on_opt_in = writer.poke
    monitor.start()
    writer.start()
    yield monitor, writer
    writer.stop()
    monitor.stop()


@pytest.mark.kube
class TestKube:
    def test_label_writes_the_fence_and_unlabel_removes_it(
            self, emu: KubeEmulator, running: tuple[FenceMonitor, RegistryWriter]) -> None:
        """A namespace labelled egress-authz.io/egress-fence=true gets the fence; without the
        label it goes; a NetworkPolicy of the user's stays."""
        emu.seed(namespace("shop"), policy_cm("shop", "p", [rule("a", "api.kadath.io")]),
                 {"apiVersion": NP[0], "kind": NP[1],
                  "metadata": {"name": "theirs", "namespace": "billing"},
                  "spec": {"podSelector": {}, "policyTypes": ["Egress"]}})
        emu.modify("v1", "Namespace", "", "shop",
                   lambda o: o["metadata"]["labels"].update({FENCE_LABEL: "true"}))
        emu.wait_for(lambda: emu.get(*NP, "shop", FENCE_NAME), timeout=10)
        fence = emu.get(*NP, "shop", FENCE_NAME)
        assert fence is not None
        assert fence["spec"]["egress"][1]["to"][0]["podSelector"]["matchLabels"] == (
            DEFAULT_GATEWAY_SELECTOR)
        emu.modify("v1", "Namespace", "", "shop",
                   lambda o: o["metadata"]["labels"].pop(FENCE_LABEL))
        emu.wait_for(lambda: emu.get(*NP, "shop", FENCE_NAME) is None, timeout=10)
        assert emu.get(*NP, "billing", "theirs") is not None

    def test_a_users_networkpolicy_with_our_label_is_never_pruned(
            self, emu: KubeEmulator, running: tuple[FenceMonitor, RegistryWriter]) -> None:
        """Only `egress-authz-fence` is ours: a NetworkPolicy copied from it (our managed-by
        label kept) under another name stays, in a fenced namespace and elsewhere."""
        _, writer = running
        ours = {"app.kubernetes.io/managed-by": "egress-authz"}
        emu.seed(namespace("shop", {FENCE_LABEL: "true"}), namespace("billing"),
                 policy_cm("shop", "p", [rule("a", "api.kadath.io")]),
                 *({"apiVersion": NP[0], "kind": NP[1],
                    "metadata": {"name": "allow-db", "namespace": ns, "labels": dict(ours)},
                    "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}
                   for ns in ("shop", "billing")))
        emu.wait_for(lambda: emu.get(*NP, "shop", FENCE_NAME), timeout=10)
        writer.reconcile()  # one more whole pass, now that everything is listed
        assert emu.get(*NP, "shop", "allow-db") is not None
        assert emu.get(*NP, "billing", "allow-db") is not None

    def test_the_client_changes_no_other_networkpolicy(self) -> None:
        """The permissions table (and so the client and the chart's RBAC) allows patch and
        delete on the fence alone; list, watch and create (not limitable by name) on any."""
        from authz.kube.permissions import NotPermitted, require

        for verb in ("patch", "delete"):
            assert require("NetworkPolicy", verb, FENCE_NAME).names == {FENCE_NAME}
            with pytest.raises(NotPermitted):
                require("NetworkPolicy", verb, "default-deny")
        for verb in ("list", "watch", "create"):
            assert not require("NetworkPolicy", verb).names

    def test_unfenced_wildcard_is_reported_until_fenced(
            self, emu: KubeEmulator, replica: Replica,
            running: tuple[FenceMonitor, RegistryWriter]) -> None:
        """A wildcard policy in an unfenced namespace: one Warning Event on its ConfigMap and
        the gauge at 1; label the namespace, the service fences it, the gauge drops to 0."""
        monitor, _ = running
        emu.seed(namespace("marketing"),
                 policy_cm("marketing", "p", [rule("a", "*.kadath.io")]),
                 policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        emu.wait_for(lambda: emu.events("marketing"), timeout=10)
        [event] = emu.events("marketing")
        assert event["reason"] == REASON_UNFENCED and event["type"] == "Warning"
        assert event["involvedObject"]["name"] == "p" and "*.kadath.io" in event["message"]
        assert not emu.events("shop")  # exact hosts are routed: nothing to report
        assert monitor.unfenced == {"marketing": ["marketing/p"]}
        assert replica.metrics.value("egress_authz_unfenced_wildcard_namespaces") == 1
        emu.modify("v1", "Namespace", "", "marketing",
                   lambda o: o["metadata"]["labels"].update({FENCE_LABEL: "true"}))
        emu.wait_for(lambda: monitor.unfenced == {}, timeout=10)
        assert replica.metrics.value("egress_authz_unfenced_wildcard_namespaces") == 0
        assert len(emu.events("marketing")) == 1  # no repeat while fenced


class TestChartFlags:
    @pytest.mark.parametrize(("values", "fence"), [
        ({}, FenceOptions(gateway_namespace="istio-egress",
                          gateway_selector=dict(DEFAULT_GATEWAY_SELECTOR))),
        ({"networkPolicy": {"allowClusterPods": False, "istiodNamespace": "mesh",
                            "dns": {"namespace": "dns", "podLabels": {"app": "coredns"}}}},
         FenceOptions(gateway_namespace="istio-egress",
                      gateway_selector=dict(DEFAULT_GATEWAY_SELECTOR), dns_namespace="dns",
                      dns_labels={"app": "coredns"}, istiod_namespace="mesh",
                      allow_cluster_pods=False)),
        ({"networkPolicy": {"fenceLabelledNamespaces": False}}, None),
    ], ids=["default", "custom", "off"])
    def test_chart_args_reach_the_fence(self, values: dict[str, Any],
                                        fence: FenceOptions | None, tmp_path: Path) -> None:
        """The chart's networkPolicy values, passed as flags, give the writer these options."""
        from authz.commands.serve import build_arg_parser
        from authz.kube.controller import KubeController
        from authz.workloads import WorkloadIndex

        with helm.Chart.load(ROOT / "charts" / "egress-authz") as chart:
            manifests = chart.render(name="egress-authz", namespace="egress-authz",
                                     values=values)
        [deploy] = [d for path, text in manifests.items() if not path.endswith("NOTES.txt")
                    for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment"]
        args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
        parsed = build_arg_parser().parse_args([*args[1:], "--kubeconfig", str(kubeconfig)])
        controller = KubeController.from_args(parsed, WorkloadIndex())
        assert controller.writer is not None
        assert controller.writer.fence_options == (fence or controller.writer.fence_options)
        assert (controller.writer.fences is None) is (fence is None)


@pytest.mark.kube
class TestNeverPruneOnNothing:
    def test_fences_kept_until_the_namespace_list_is_known(
            self, emu: KubeEmulator, replica: Replica) -> None:
        """While the opted-in namespaces are unknown, a fence already in the cluster stays;
        once known and empty, it is pruned."""
        existing = fence_policy("shop", OPTIONS)
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]), existing)
        replica.start()
        known: list[set[str] | None] = [None]
        writer = RegistryWriter(replica.api(), replica.store, options=RenderOptions(),
                                is_leader=lambda: True, backoff_cap=0.5, watch_timeout=30,
                                fences=lambda: known[0])
        for r in writer.reflectors:
            r.start()
        try:
            emu.wait_for(lambda: replica.store.current is not None
                         and all(r.synced.is_set() for r in writer.reflectors), timeout=10)
            assert writer.reconcile()
            assert emu.get(*NP, "shop", FENCE_NAME) is not None
            known[0] = set()
            assert writer.reconcile()
            assert emu.get(*NP, "shop", FENCE_NAME) is None
        finally:
            for r in writer.reflectors:
                r.stop()
