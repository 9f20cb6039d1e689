"""authz.workloads: Pods -> the index Check reads by source address."""

from __future__ import annotations

from typing import Any

import pytest

from authz.workloads import MAX_POD_IPS, WorkloadIndex, workload_from_pod


def pod(name: str, *ips: str, ns: str = "shop", sa: str = "cart",
        labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running"}
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    obj: dict[str, Any] = {"metadata": {"name": name, "namespace": ns, "labels": labels or {}},
                           "spec": {"serviceAccountName": sa}, "status": status}
    for key, value in extra.items():
        section, _, field = key.partition("__")
        obj[section][field] = value
    return obj


def indexed(*pods: dict[str, Any]) -> WorkloadIndex:
    index = WorkloadIndex()
    for p in pods:
        w = workload_from_pod(p)
        assert w is not None, p
        index.upsert(w)
    return index


def who(index: WorkloadIndex, ip: str) -> str | None:
    w = index.lookup(ip)
    return f"{w.namespace}/{w.name}" if w is not None else None


class TestWorkloadFromPod:
    def test_dual_stack_keeps_every_address_canonical(self) -> None:
        """status.podIPs, both families, written any way: canonical, podIP first."""
        w = workload_from_pod(pod("a", "FD00:10:0:0:0:0:0:7", "10.0.0.7"))
        assert w is not None
        assert (w.ip, w.ips) == ("fd00:10::7", ("fd00:10::7", "10.0.0.7"))

    def test_pod_ip_alone(self) -> None:
        """Older API servers (and hand-written manifests) give only status.podIP."""
        w = workload_from_pod({"metadata": {"name": "a"}, "status": {"podIP": "10.0.0.7"}})
        assert w is not None and w.ips == ("10.0.0.7",)
        assert (w.namespace, w.service_account) == ("default", "default")

    def test_pending_pod_with_an_address_counts(self) -> None:
        """Init containers call out (behind a native sidecar) before the Pod is Running."""
        w = workload_from_pod(pod("starting", "10.0.0.7", status__phase="Pending"))
        assert w is not None and w.ips == ("10.0.0.7",)

    @pytest.mark.parametrize("obj", [
        pod("pending", status__phase="Pending"),
        pod("done", "10.0.0.7", status__phase="Succeeded"),
        pod("failed", "10.0.0.7", status__phase="Failed"),
        pod("lost", "10.0.0.7", status__phase="Unknown"),
        pod("no-ip"),
        pod("bad-ip", "not-an-ip"),
        pod("host", "192.168.1.10", spec__hostNetwork=True),
    ])
    def test_pods_that_identify_nobody(self, obj: dict[str, Any]) -> None:
        """Ended or unknown, no valid address, or the node's shared address: not indexed."""
        assert workload_from_pod(obj) is None

    def test_hostile_shapes_are_ignored_not_fatal(self) -> None:
        """Wrong types anywhere and padded address lists never raise; at most one address
        per family is taken."""
        w = workload_from_pod({
            "metadata": {"name": "a", "labels": ["x"]}, "spec": "nope",
            "status": {"podIP": 7, "podIPs": [{"ip": "10.0.0.7"}, "10.0.0.8", {"ip": None},
                                              *({"ip": f"10.1.0.{i}"} for i in range(100))]},
        })
        assert w is not None and len(w.ips) == MAX_POD_IPS and w.ips[0] == "10.0.0.7"
        assert dict(w.labels) == {}
        assert workload_from_pod({"status": {"podIPs": "10.0.0.7"}}) is None


class TestIndex:
    def test_never_falsy(self) -> None:
        """An empty index is still the index: `index or WorkloadIndex()` once swapped the
        one Check reads for a new one, so the index is not a sized container at all."""
        index = WorkloadIndex()
        assert bool(index) is True
        assert (index or WorkloadIndex()) is index
        assert not hasattr(index, "__len__") and index.pod_count == 0

    def test_every_address_and_every_spelling(self) -> None:
        """Both addresses of a dual-stack Pod; IPv6 however written; IPv4-mapped IPv6."""
        index = indexed(pod("a", "fd00:10::7", "10.0.0.7"))
        for ip in ("fd00:10::7", "fd00:10:0::0007", "FD00:10::7", "10.0.0.7",
                   "::ffff:10.0.0.7", "::ffff:a00:7"):
            assert who(index, ip) == "shop/a", ip
        assert who(index, "10.0.0.8") is None and who(index, "garbage") is None

    def test_address_change_releases_the_old_one(self) -> None:
        """A Pod whose address changed is no longer found at the old one."""
        index = indexed(pod("a", "10.0.0.7"))
        w = workload_from_pod(pod("a", "10.0.0.9"))
        assert w is not None
        index.upsert(w)
        assert (who(index, "10.0.0.7"), who(index, "10.0.0.9")) == (None, "shop/a")

    def test_reused_address_after_delete(self) -> None:
        """The old Pod's delete, then the new Pod: the address is the new Pod's."""
        index = indexed(pod("old", "10.0.0.7"))
        index.remove("shop", "old")
        new = workload_from_pod(pod("new", "10.0.0.7", sa="frontend"))
        assert new is not None
        index.upsert(new)
        assert who(index, "10.0.0.7") == "shop/new"

    def test_two_claimants_mean_nobody_until_one_goes(self) -> None:
        """The new Pod is seen before the old one's end: the address names neither
        (never the old Pod's labels for the new caller); after the delete, the new one."""
        index = indexed(pod("old", "10.0.0.7", labels={"function": "finance"}),
                        pod("new", "10.0.0.7", labels={"function": "web"}))
        assert who(index, "10.0.0.7") is None
        index.remove("shop", "old")
        assert who(index, "10.0.0.7") == "shop/new"

    def test_late_delete_of_a_namesake_keeps_the_new_pod(self) -> None:
        """The old Pod web/cart's delete arrives after shop/cart took its address: the
        address stays shop/cart's (removal compares namespace and name, not name)."""
        index = indexed(pod("cart", "10.0.0.7", ns="web"), pod("cart", "10.0.0.7", ns="shop"))
        index.remove("web", "cart")
        assert who(index, "10.0.0.7") == "shop/cart"

    def test_label_change_replaces_the_entry(self) -> None:
        """The next lookup sees the Pod's new labels."""
        index = indexed(pod("a", "10.0.0.7", labels={"function": "web"}))
        w = workload_from_pod(pod("a", "10.0.0.7", labels={"function": "finance"}))
        assert w is not None
        index.upsert(w)
        found = index.lookup("10.0.0.7")
        assert found is not None and found.labels["function"] == "finance"

    def test_replace_all(self) -> None:
        """A relist: Pods not listed are gone, ambiguous addresses name nobody."""
        index = indexed(pod("gone", "10.0.0.1"))
        pods = [workload_from_pod(p) for p in (
            pod("a", "fd00::7", "10.0.0.7"), pod("b", "10.0.0.8"), pod("c", "10.0.0.8"))]
        index.replace_all(w for w in pods if w is not None)
        assert who(index, "10.0.0.1") is None
        assert who(index, "fd00::0007") == "shop/a" and who(index, "10.0.0.7") == "shop/a"
        assert who(index, "10.0.0.8") is None
        assert index.pod_count == 3
        index.remove("shop", "c")
        assert who(index, "10.0.0.8") == "shop/b"
