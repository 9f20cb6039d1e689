"""List calls are paged (`limit`/`continue`) and read the API server's cache when they may.

Checked through the emulator's request log: what the service asks the API server
for, not only that the objects arrive.
"""

from __future__ import annotations

import pytest

from authz.kube.client import LIST_PAGE_SIZE, KubeApi, KubeGone
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, Replica, emu, pod, policy_cm, replica, rule

__all__ = ["emu", "replica"]  # fixtures
pytestmark = pytest.mark.kube


def lists(emu: KubeEmulator, resource: str) -> list[dict[str, str]]:
    """The query of every (non-watch) list request for `resource`, in order."""
    return [r.query for r in list(emu.requests)
            if r.method == "GET" and r.path.endswith(f"/{resource}")
            and r.query.get("watch") != "true"]


def compaction(emu: KubeEmulator) -> None:
    """A write, then compaction up to it: every older list snapshot is gone."""
    emu.seed(policy_cm("other", f"cm{emu.resource_version}", []))
    emu.compact()


def pods(n: int) -> list[dict[str, object]]:
    return [pod(f"ns{i % 3}", f"p{i:03d}", f"10.1.{i // 250}.{i % 250 + 1}") for i in range(n)]


class TestPagedLists:
    def test_every_page_is_read(self, emu: KubeEmulator) -> None:
        """25 Pods in pages of 10: three requests, the later ones by continue token alone,
        every Pod once."""
        emu.seed(*pods(25))
        api = KubeApi(emu.api_client(), service_ns=SVC_NS)
        items, rv = api.list("Pod", page_size=10)
        assert sorted(o["metadata"]["name"] for o in items) == [f"p{i:03d}" for i in range(25)]
        assert int(rv) == emu.resource_version
        queries = lists(emu, "pods")
        assert [q["limit"] for q in queries] == ["10", "10", "10"]
        assert "continue" not in queries[0]
        assert all(q.get("continue") and "resourceVersion" not in q for q in queries[1:])

    def test_expired_token_restarts_once(self, emu: KubeEmulator) -> None:
        """History compacted between two pages: the list starts over and is complete."""
        emu.seed(*pods(12))
        api = KubeApi(emu.api_client(), service_ns=SVC_NS)
        compacted = []

        def compact_once(method: str, path: str) -> None:
            if not compacted and len(lists(emu, "pods")) == 1:
                compacted.append(True)
                compaction(emu)

        emu.before_request = compact_once
        items, _ = api.list("Pod", page_size=5)
        assert len(items) == 12
        assert [bool(q.get("continue")) for q in lists(emu, "pods")] == [
            False, True, False, True, True]

    def test_gone_twice_is_raised(self, emu: KubeEmulator) -> None:
        """A list that cannot finish (its token always expires) ends with KubeGone."""
        emu.seed(*pods(12))
        api = KubeApi(emu.api_client(), service_ns=SVC_NS)
        emu.before_request = lambda method, path: compaction(emu)
        with pytest.raises(KubeGone):
            api.list("Pod", page_size=5)


class TestReflectorLists:
    def test_first_list_reads_the_cache_in_pages(self, emu: KubeEmulator,
                                                 replica: Replica) -> None:
        """Every watch starts with resourceVersion=0 (the API server's watch cache) and a limit."""
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]), *pods(3))
        assert replica.start().wait_ready(5)
        for resource in ("configmaps", "pods"):
            queries = lists(emu, resource)
            assert queries, resource
            for q in queries:
                assert q["resourceVersion"] == "0"
                assert q["limit"] == str(LIST_PAGE_SIZE)

    def test_relist_after_gone_is_a_consistent_paged_read(
            self, emu: KubeEmulator, replica: Replica) -> None:
        """After 410 Gone the cache may be behind: the relist asks for the latest (no
        resourceVersion), still paged, and the change missed meanwhile is seen."""
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        source = replica.start()
        assert source.wait_ready(5)
        emu.stop()
        emu.seed(policy_cm("web", "q", [rule("b", "api.leng.com")]))
        emu.compact()
        emu.start()
        emu.wait_for(lambda: replica.allows("web", "api.leng.com"), timeout=5)
        relists = [q for q in lists(emu, "configmaps")
                   if q.get("labelSelector") == "egress-authz.io/policy=true"][1:]
        assert relists
        assert all("resourceVersion" not in q and q["limit"] == str(LIST_PAGE_SIZE)
                   for q in relists)
