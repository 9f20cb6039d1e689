"""Policies and workloads from the (emulated) cluster: timing, Events, outages, 410 relists."""

from __future__ import annotations

import time

import pytest

from authz.policy import PolicyError, parse_configmap
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, Replica, emu, pod, policy_cm, replica, rule

__all__ = ["emu", "replica"]  # fixtures
pytestmark = pytest.mark.kube


class TestPolicies:
    def test_not_ready_until_first_full_list(self, emu: KubeEmulator, replica: Replica) -> None:
        """Readiness waits for the first lists, then the seeded policy is in force."""
        emu.seed(policy_cm("shop", "p", [rule("kadath", "api.kadath.io")]))
        source = replica.start()
        assert not source.ready() or replica.store.current is not None
        assert source.wait_ready(5)
        assert replica.allows("shop", "api.kadath.io")
        assert not replica.allows("shop", "api.leng.com")

    def test_create_modify_delete_within_a_second(self, emu: KubeEmulator,
                                                  replica: Replica) -> None:
        """Each change to a policy ConfigMap is decided on within 1 s."""
        assert replica.start().wait_ready(5)
        for step, want in (
            (lambda: emu.seed(policy_cm("shop", "p", [rule("kadath", "api.kadath.io")])), True),
            (lambda: emu.modify("v1", "ConfigMap", "shop", "p", lambda o: o["data"].update(
                {"policy.yaml": "rules: [{name: leng, hosts: [api.leng.com]}]"})), False),
            (lambda: emu.remove("v1", "ConfigMap", "shop", "p"), False),
        ):
            start = time.monotonic()
            step()
            emu.wait_for(lambda w=want: replica.allows("shop", "api.kadath.io") == w
                         and replica.store.current is not None
                         and (w or replica.store.current.revision > 1), timeout=1.0)
            assert time.monotonic() - start < 1.0
        emu.wait_for(lambda: not replica.allows("shop", "api.leng.com"), timeout=1.0)

    def test_invalid_configmap_keeps_last_good_and_posts_events(
            self, emu: KubeEmulator, replica: Replica) -> None:
        """A bad edit: Warning PolicyInvalid with the exact message, old rules kept; fixed:
        Normal PolicyAccepted."""
        emu.seed(policy_cm("shop", "p", [rule("kadath", "api.kadath.io")]))
        assert replica.start().wait_ready(5)
        bad = "rules: [{name: kadath, hosts: ['*'], bogus: 1}]"
        emu.modify("v1", "ConfigMap", "shop", "p",
                   lambda o: o["data"].update({"policy.yaml": bad}))
        warning = emu.wait_for(lambda: emu.events("shop", involved="p",
                                                  reason="PolicyInvalid"), timeout=2)
        stored = emu.get("v1", "ConfigMap", "shop", "p")
        assert stored is not None
        with pytest.raises(PolicyError) as exc:
            parse_configmap(stored, cluster_namespace=SVC_NS)
        assert warning[0]["type"] == "Warning"
        assert warning[0]["message"] == str(exc.value)
        assert warning[0]["involvedObject"]["uid"] == stored["metadata"]["uid"]
        assert replica.allows("shop", "api.kadath.io")  # the last good policy is enforced
        assert replica.errors and "shop/p" in replica.errors[-1]
        errors = {"source": "kubernetes"}
        assert replica.metrics.value("egress_authz_policy_errors_total", errors) == 1
        emu.modify("v1", "ConfigMap", "shop", "p", lambda o: o["data"].update(
            {"policy.yaml": "rules: [{name: leng, hosts: [api.leng.com]}]"}))
        accepted = emu.wait_for(lambda: emu.events("shop", involved="p",
                                                   reason="PolicyAccepted"), timeout=2)
        assert accepted[0]["type"] == "Normal"
        emu.wait_for(lambda: replica.allows("shop", "api.leng.com"), timeout=1)
        assert len(emu.events("shop", reason="PolicyInvalid")) == 1  # not repeated
        assert replica.metrics.value("egress_authz_policy_errors_total", errors) == 1

    def test_invalid_from_the_start_adds_nothing(self, emu: KubeEmulator,
                                                 replica: Replica) -> None:
        """A ConfigMap that never validated contributes nothing, and says so."""
        emu.seed(policy_cm("shop", "p", [], text="rules: {not: a list}"))
        assert replica.start().wait_ready(5)
        assert not replica.allows("shop", "api.kadath.io")
        emu.wait_for(lambda: emu.events("shop", reason="PolicyInvalid"), timeout=2)

    def test_cluster_tier_and_namespace_selector(self, emu: KubeEmulator,
                                                 replica: Replica) -> None:
        """Cluster deny beats a namespace allow; only selected namespaces' policies count."""
        emu.seed(
            {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "shop", "labels": {"egress": "on"}}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}},
            policy_cm("shop", "p", [rule("a", "api.kadath.io", "evil.example")]),
            policy_cm("web", "p", [rule("a", "api.kadath.io")]),
            policy_cm(SVC_NS, "cluster", [], labels={"egress-authz.io/tier": "cluster"},
                      text="deny: [evil.example]\nrules: []"),
        )
        assert replica.start(namespace_selector="egress=on").wait_ready(5)
        assert replica.allows("shop", "api.kadath.io")
        assert not replica.allows("shop", "evil.example")
        assert not replica.allows("web", "api.kadath.io")
        emu.modify("v1", "Namespace", "", "web", lambda o: o["metadata"].setdefault(
            "labels", {}).update(egress="on"))
        emu.wait_for(lambda: replica.allows("web", "api.kadath.io"), timeout=1)


class TestWorkloads:
    def test_pod_label_change_is_used_by_the_next_check(self, emu: KubeEmulator,
                                                        replica: Replica) -> None:
        """A rule selecting by label follows the Pod's labels; Pods with an address count
        from Pending on; ended Pods leave the index."""
        emu.seed(policy_cm("shop", "p", [rule("fin", "api.leng.com",
                                               labels={"function": "finance"})]),
                 pod("shop", "a", "10.0.0.7", labels={"function": "web"}),
                 pod("shop", "starting", "10.0.0.8", phase="Pending"),
                 pod("shop", "failed", "10.0.0.6", phase="Failed"))
        assert replica.start().wait_ready(5)
        assert replica.index.lookup("10.0.0.8") is not None  # init containers call out too
        assert replica.index.lookup("10.0.0.6") is None
        assert not replica.allows("shop", "api.leng.com", ip="10.0.0.7")
        emu.modify("v1", "Pod", "shop", "a",
                   lambda o: o["metadata"]["labels"].update(function="finance"))
        emu.wait_for(lambda: replica.allows("shop", "api.leng.com", ip="10.0.0.7"), timeout=1)
        emu.modify("v1", "Pod", "shop", "a", lambda o: o["status"].update(podIP="10.0.0.9"))
        emu.wait_for(lambda: replica.index.lookup("10.0.0.7") is None
                     and replica.index.lookup("10.0.0.9") is not None, timeout=1)
        emu.modify("v1", "Pod", "shop", "a", lambda o: o["status"].update(phase="Succeeded"))
        emu.wait_for(lambda: replica.index.lookup("10.0.0.9") is None, timeout=1)


    def test_every_pod_ip_of_a_dual_stack_pod(self, emu: KubeEmulator,
                                              replica: Replica) -> None:
        """status.podIPs from the watch: both families, the IPv6 one however written, and a
        reused address that two Pods claim names neither until the old one goes."""
        dual = pod("shop", "dual", "fd00:10:0:0:0:0:0:7", labels={"function": "finance"})
        dual["status"]["podIPs"] = [{"ip": "fd00:10:0:0:0:0:0:7"}, {"ip": "10.0.0.7"}]
        emu.seed(policy_cm("shop", "p", [rule("fin", "api.leng.com",
                                               labels={"function": "finance"})]), dual,
                 pod("shop", "host", "192.168.0.1", sa="cart") | {"spec": {
                     "serviceAccountName": "cart", "hostNetwork": True,
                     "containers": [{"name": "c", "image": "x"}]}})
        assert replica.start().wait_ready(5)
        for ip in ("10.0.0.7", "fd00:10::7", "::ffff:10.0.0.7"):
            assert replica.allows("shop", "api.leng.com", ip=ip), ip
        assert replica.index.lookup("192.168.0.1") is None  # the node's address: nobody's
        emu.seed(pod("shop", "newcomer", "10.0.0.7", sa="frontend"))
        emu.wait_for(lambda: replica.index.lookup("10.0.0.7") is None, timeout=1)
        assert replica.index.lookup("fd00:10::7") is not None
        emu.remove("v1", "Pod", "shop", "dual")
        emu.wait_for(lambda: (w := replica.index.lookup("10.0.0.7")) is not None
                     and w.name == "newcomer", timeout=1)
        assert replica.index.lookup("fd00:10::7") is None


class TestResilience:
    def test_dropped_watch_then_410_relists_and_misses_nothing(
            self, emu: KubeEmulator, replica: Replica) -> None:
        """Watches cut and history compacted: the source relists and sees every change."""
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        source = replica.start()
        assert source.wait_ready(5)
        reconnects = {"resource": "ConfigMap"}
        assert replica.metrics.value("egress_authz_watch_reconnects_total", reconnects) == 0
        emu.stop()  # unreachable while things change, so the watch cannot keep up
        emu.seed(policy_cm("web", "q", [rule("b", "api.leng.com")]))
        emu.remove("v1", "ConfigMap", "shop", "p")
        emu.compact()
        emu.start()
        emu.wait_for(lambda: replica.allows("web", "api.leng.com")
                     and not replica.allows("shop", "api.kadath.io"), timeout=5)
        # The policy watch missed changes and must have relisted; the cluster-tier watch
        # may resume from a bookmark newer than the compaction, which is no loss.
        assert any(r.lists >= 2 for r in source.reflectors if r.kind == "ConfigMap")
        assert replica.metrics.value("egress_authz_watch_reconnects_total", reconnects) > 0
        emu.drop_watches()  # a plain drop: re-watch from the last resourceVersion
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        emu.wait_for(lambda: replica.allows("shop", "api.kadath.io"), timeout=3)

    def test_api_down_for_five_seconds_keeps_serving(self, emu: KubeEmulator,
                                                     replica: Replica) -> None:
        """With the API server gone for 5 s, checks are answered from the snapshot, readiness
        holds, reconnects are counted, and changes flow again once it is back."""
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        source = replica.start()
        assert source.wait_ready(5)
        emu.stop()
        deadline = time.monotonic() + 5
        answered = 0
        while time.monotonic() < deadline:
            assert replica.allows("shop", "api.kadath.io")
            answered += 1
            time.sleep(0.05)
        assert source.ready()
        assert not source.health.reachable
        assert replica.metrics.value("egress_authz_kube_api_unreachable") == 1
        assert source.health.reconnects >= 4
        # never a hot loop: a few reconnects per second per watch at most
        assert source.health.reconnects < 5 * 5 * len(source.reflectors)
        emu.start()
        emu.seed(policy_cm("shop", "p", [rule("a", "api.leng.com")]))
        emu.wait_for(lambda: replica.allows("shop", "api.leng.com"), timeout=3)
        emu.wait_for(lambda: source.health.reachable, timeout=3)
        emu.wait_for(lambda: replica.metrics.value("egress_authz_kube_api_unreachable") == 0,
                     timeout=1)
        assert answered > 50
