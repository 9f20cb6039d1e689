"""The Kubernetes API emulator, driven by the official client exactly as production code is.

If these pass, a failure in tests/test_kube_*.py is about our controller, not the emulator.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from tests.kube_emulator import KubeEmulator, parse_label_selector

pytestmark = pytest.mark.kube

APPLY = "application/apply-patch+yaml"


@pytest.fixture
def emu() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as e:
        yield e


@pytest.fixture
def api(emu: KubeEmulator) -> Iterator[client.ApiClient]:
    with emu.api_client() as c:
        yield c


def cm(name: str, ns: str = "shop", labels: dict[str, str] | None = None,
       data: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "data": data or {}}


def pod(name: str, ns: str = "shop", phase: str = "Running", ip: str = "10.0.0.1",
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"serviceAccountName": "default", "containers": [{"name": "c", "image": "x"}]},
            "status": {"phase": phase, "podIP": ip}}


def se(name: str, hosts: list[str], ns: str = "shop") -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"app.kubernetes.io/managed-by": "egress-authz"}},
            "spec": {"hosts": hosts, "location": "MESH_EXTERNAL", "resolution": "DNS",
                     "ports": [{"number": 443, "name": "tls-443", "protocol": "TLS"}]}}


def collect(stream: Iterator[dict[str, Any]], out: queue.Queue[Any]) -> threading.Thread:
    def run() -> None:
        try:
            for ev in stream:
                out.put(ev)
        except Exception as e:  # the test inspects what ended the stream
            out.put(e)
        out.put(None)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def take(out: queue.Queue[Any], n: int, timeout: float = 5.0) -> list[Any]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        got.append(out.get(timeout=max(0.01, deadline - time.monotonic())))
    return got


class TestSelectors:
    def test_label_selector_forms(self) -> None:
        """Equality, inequality, existence, absence and set forms all parse and match."""
        lb = {"a": "1", "b": "x"}
        assert parse_label_selector("a=1")(lb)
        assert parse_label_selector("a==1,b")(lb)
        assert not parse_label_selector("a!=1")(lb)
        assert parse_label_selector("!c")(lb)
        assert not parse_label_selector("!a")(lb)
        assert parse_label_selector("b in (x, y),a notin (2)")(lb)
        assert not parse_label_selector("b in (y,z)")(lb)
        policy = {"egress-authz.io/policy": "true"}
        assert parse_label_selector("egress-authz.io/policy=true")(policy)


class TestCrud:
    def test_create_get_conflict_list(self, emu: KubeEmulator, api: client.ApiClient) -> None:
        """Create answers 201, a second create 409, list carries a resourceVersion."""
        core = client.CoreV1Api(api)
        core.create_namespaced_config_map("shop", cm("a", labels={"p": "1"}))
        with pytest.raises(ApiException) as exc:
            core.create_namespaced_config_map("shop", cm("a"))
        assert exc.value.status == 409
        core.create_namespaced_config_map("web", cm("b", ns="web"))
        got = core.read_namespaced_config_map("a", "shop")
        assert got.metadata.uid and got.metadata.resource_version
        everything = core.list_config_map_for_all_namespaces()
        assert {i.metadata.name for i in everything.items} == {"a", "b"}
        assert int(everything.metadata.resource_version) == emu.resource_version
        only = core.list_config_map_for_all_namespaces(label_selector="p=1")
        assert [i.metadata.name for i in only.items] == ["a"]
        assert len(core.list_namespaced_config_map("web").items) == 1
        with pytest.raises(ApiException) as exc:
            core.read_namespaced_config_map("nope", "shop")
        assert exc.value.status == 404

    def test_replace_checks_resource_version(self, api: client.ApiClient) -> None:
        """A PUT with a stale resourceVersion is refused with 409, as leader election needs."""
        core = client.CoreV1Api(api)
        first = core.create_namespaced_config_map("shop", cm("a"))
        first.data = {"k": "1"}
        core.replace_namespaced_config_map("a", "shop", first)
        first.data = {"k": "2"}
        with pytest.raises(ApiException) as exc:
            core.replace_namespaced_config_map("a", "shop", first)
        assert exc.value.status == 409

    def test_patch_and_delete(self, emu: KubeEmulator, api: client.ApiClient) -> None:
        """Strategic/merge patches merge maps; delete removes the object."""
        core = client.CoreV1Api(api)
        core.create_namespaced_config_map("shop", cm("a", data={"x": "1", "y": "2"}))
        core.patch_namespaced_config_map("a", "shop", {"data": {"x": None, "z": "3"}})
        assert core.read_namespaced_config_map("a", "shop").data == {"y": "2", "z": "3"}
        core.patch_namespaced_config_map(
            "a", "shop", [{"op": "replace", "path": "/data/y", "value": "9"}])
        assert core.read_namespaced_config_map("a", "shop").data["y"] == "9"
        core.delete_namespaced_config_map("a", "shop")
        assert emu.get("v1", "ConfigMap", "shop", "a") is None

    def test_pods_field_selector_and_namespaces(self, emu: KubeEmulator,
                                                api: client.ApiClient) -> None:
        """Pods filter on status.phase; cluster-scoped Namespaces filter on labels."""
        emu.seed(pod("a"), pod("b", phase="Pending", ip=""),
                 {"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": "shop", "labels": {"team": "x"}}},
                 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
        core = client.CoreV1Api(api)
        running = core.list_pod_for_all_namespaces(field_selector="status.phase=Running")
        assert [p.metadata.name for p in running.items] == ["a"]
        assert running.items[0].status.pod_ip == "10.0.0.1"
        assert [n.metadata.name for n in core.list_namespace(label_selector="team").items] == [
            "shop"]

    def test_events_and_leases(self, emu: KubeEmulator, api: client.ApiClient) -> None:
        """core/v1 Events and coordination.k8s.io/v1 Leases round-trip."""
        core = client.CoreV1Api(api)
        core.create_namespaced_event("shop", {
            "metadata": {"generateName": "a."},
            "involvedObject": {"kind": "ConfigMap", "name": "a", "namespace": "shop"},
            "type": "Warning", "reason": "PolicyInvalid", "message": "bad"})
        assert [e["message"] for e in emu.events("shop", involved="a")] == ["bad"]
        coord = client.CoordinationV1Api(api)
        lease = coord.create_namespaced_lease("authz", {
            "metadata": {"name": "egress-authz"},
            "spec": {"holderIdentity": "a", "leaseDurationSeconds": 2}})
        lease.spec.holder_identity = "b"
        coord.replace_namespaced_lease("egress-authz", "authz", lease)
        assert coord.read_namespaced_lease("egress-authz", "authz").spec.holder_identity == "b"


class TestServerSideApply:
    def test_apply_creates_then_restores_hand_edits(self, emu: KubeEmulator,
                                                    api: client.ApiClient) -> None:
        """Apply creates when absent; re-applying puts back what a human changed."""
        co = client.CustomObjectsApi(api)
        args = ("networking.istio.io", "v1", "shop", "serviceentries", "allowed")
        obj = se("allowed", ["api.kadath.io"])
        co.patch_namespaced_custom_object(*args, obj, field_manager="egress-authz", force=True,
                                          _content_type=APPLY)
        stored = emu.get("networking.istio.io/v1", "ServiceEntry", "shop", "allowed")
        assert stored is not None and stored["spec"]["hosts"] == ["api.kadath.io"]
        assert [m["manager"] for m in stored["metadata"]["managedFields"]] == ["egress-authz"]
        assert emu.requests[-1].content_type == APPLY

        def tamper(o: dict[str, Any]) -> None:
            o["spec"]["hosts"].append("evil.example")
            o["spec"]["resolution"] = "NONE"

        emu.modify("networking.istio.io/v1", "ServiceEntry", "shop", "allowed", tamper)
        # Without force, the fields someone else now owns are a conflict.
        with pytest.raises(ApiException) as exc:
            co.patch_namespaced_custom_object(*args, obj, field_manager="egress-authz",
                                              _content_type=APPLY)
        assert exc.value.status == 409
        co.patch_namespaced_custom_object(*args, obj, field_manager="egress-authz", force=True,
                                          _content_type=APPLY)
        stored = emu.get("networking.istio.io/v1", "ServiceEntry", "shop", "allowed")
        assert stored is not None
        assert stored["spec"]["hosts"] == ["api.kadath.io"]
        assert stored["spec"]["resolution"] == "DNS"

    def test_apply_drops_fields_no_longer_applied(self, emu: KubeEmulator,
                                                  api: client.ApiClient) -> None:
        """A field the manager stops applying is removed; an identical apply is a no-op."""
        co = client.CustomObjectsApi(api)
        args = ("networking.istio.io", "v1", "shop", "serviceentries", "x")
        obj = se("x", ["a.example"])
        obj["spec"]["exportTo"] = ["."]
        co.patch_namespaced_custom_object(*args, obj, field_manager="m", force=True,
                                          _content_type=APPLY)
        del obj["spec"]["exportTo"]
        co.patch_namespaced_custom_object(*args, obj, field_manager="m", force=True,
                                          _content_type=APPLY)
        stored = emu.get("networking.istio.io/v1", "ServiceEntry", "shop", "x")
        assert stored is not None and "exportTo" not in stored["spec"]
        rv = emu.resource_version
        co.patch_namespaced_custom_object(*args, obj, field_manager="m", force=True,
                                          _content_type=APPLY)
        assert emu.resource_version == rv

    def test_custom_objects_list_and_delete(self, emu: KubeEmulator,
                                            api: client.ApiClient) -> None:
        """Custom objects list by label across namespaces and delete."""
        emu.seed(se("a", ["a.example"]), se("b", ["b.example"], ns="web"))
        co = client.CustomObjectsApi(api)
        got = co.list_cluster_custom_object(
            "networking.istio.io", "v1", "serviceentries",
            label_selector="app.kubernetes.io/managed-by=egress-authz")
        assert sorted(i["metadata"]["name"] for i in got["items"]) == ["a", "b"]
        co.delete_namespaced_custom_object("networking.istio.io", "v1", "web",
                                           "serviceentries", "b")
        assert len(emu.list("networking.istio.io/v1", "ServiceEntry")) == 1


class TestWatch:
    def test_watch_added_modified_deleted(self, emu: KubeEmulator,
                                          api: client.ApiClient) -> None:
        """Watch().stream from a list's resourceVersion sees ADDED, MODIFIED, DELETED."""
        core = client.CoreV1Api(api)
        emu.seed(cm("before"))
        rv = core.list_config_map_for_all_namespaces().metadata.resource_version
        out: queue.Queue[Any] = queue.Queue()
        w = watch.Watch()
        collect(w.stream(core.list_config_map_for_all_namespaces, resource_version=rv,
                         timeout_seconds=5), out)
        core.create_namespaced_config_map("shop", cm("a"))
        core.patch_namespaced_config_map("a", "shop", {"data": {"k": "v"}})
        core.delete_namespaced_config_map("a", "shop")
        events = take(out, 3)
        w.stop()
        assert [(e["type"], e["object"].metadata.name) for e in events] == [
            ("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
        assert events[1]["object"].data == {"k": "v"}

    def test_watch_without_rv_lists_first_and_selector_transitions(
            self, emu: KubeEmulator, api: client.ApiClient) -> None:
        """No resourceVersion: current objects come as ADDED; leaving a selector is DELETED."""
        emu.seed(cm("a", labels={"p": "true"}), cm("b"))
        core = client.CoreV1Api(api)
        out: queue.Queue[Any] = queue.Queue()
        collect(watch.Watch().stream(core.list_config_map_for_all_namespaces,
                                     label_selector="p=true", timeout_seconds=5), out)
        assert take(out, 1)[0]["type"] == "ADDED"
        emu.modify("v1", "ConfigMap", "shop", "b", lambda o: o["metadata"]["labels"].update(
            p="true"))
        emu.modify("v1", "ConfigMap", "shop", "a", lambda o: o["metadata"]["labels"].clear())
        got = take(out, 2)
        assert [(e["type"], e["object"].metadata.name) for e in got] == [
            ("ADDED", "b"), ("DELETED", "a")]

    def test_bookmarks_and_timeout(self, emu: KubeEmulator, api: client.ApiClient) -> None:
        """allowWatchBookmarks yields BOOKMARKs; timeoutSeconds ends the stream cleanly."""
        core = client.CoreV1Api(api)
        rv = core.list_namespaced_pod("shop").metadata.resource_version
        emu.seed(cm("other"))  # moves the global resourceVersion; bookmarks follow it
        resp = core.list_namespaced_pod("shop", watch=True, resource_version=rv,
                                        allow_watch_bookmarks=True, timeout_seconds=1,
                                        _preload_content=False)
        start = time.monotonic()
        lines = [line for line in watch.watch.iter_resp_lines(resp) if line]
        assert time.monotonic() - start < 3
        assert lines and all('"BOOKMARK"' in line for line in lines)
        assert f'"resourceVersion": "{emu.resource_version}"' in lines[-1]

    def test_too_old_resource_version_is_410(self, emu: KubeEmulator,
                                             api: client.ApiClient) -> None:
        """After compact(), a watch from an old resourceVersion gets an ERROR 410 event."""
        core = client.CoreV1Api(api)
        rv = core.list_config_map_for_all_namespaces().metadata.resource_version
        emu.seed(cm("a"))
        emu.compact()
        resp = core.list_config_map_for_all_namespaces(
            watch=True, resource_version=rv, timeout_seconds=2, _preload_content=False)
        lines = [line for line in watch.watch.iter_resp_lines(resp) if line]
        assert len(lines) == 1 and '"ERROR"' in lines[0] and '"code": 410' in lines[0]
        assert '"reason": "Expired"' in lines[0]
        # The official Watch turns it into ApiException(410) when a timeout disables retries.
        with pytest.raises(ApiException) as exc:
            for _ in watch.Watch().stream(core.list_config_map_for_all_namespaces,
                                          resource_version=rv, timeout_seconds=2):
                pass
        assert exc.value.status == 410
        # From the current resourceVersion it is fine.
        fresh = core.list_config_map_for_all_namespaces().metadata.resource_version
        assert list(watch.Watch().stream(core.list_config_map_for_all_namespaces,
                                         resource_version=fresh, timeout_seconds=1)) == []

    def test_drop_watches_cuts_the_connection(self, emu: KubeEmulator,
                                              api: client.ApiClient) -> None:
        """drop_watches() ends open streams with a connection error on the client side."""
        core = client.CoreV1Api(api)
        out: queue.Queue[Any] = queue.Queue()
        collect(watch.Watch().stream(core.list_config_map_for_all_namespaces,
                                     timeout_seconds=10), out)
        emu.wait_for(lambda: any(r.query.get("watch") for r in emu.requests))
        time.sleep(0.05)
        start = time.monotonic()
        emu.drop_watches()
        end = out.get(timeout=5)
        assert isinstance(end, (urllib3.exceptions.HTTPError, OSError)) or end is None
        assert time.monotonic() - start < 2


class TestStopStart:
    def test_unreachable_then_back_on_the_same_port(self, emu: KubeEmulator,
                                                    api: client.ApiClient) -> None:
        """stop() refuses connections (even kept-alive ones); start() serves the same state."""
        core = client.CoreV1Api(api)
        emu.seed(cm("a"))
        port = emu.port
        core.read_namespaced_config_map("a", "shop")  # a pooled keep-alive connection
        emu.stop()
        with pytest.raises(urllib3.exceptions.HTTPError):
            core.read_namespaced_config_map("a", "shop", _request_timeout=1)
        emu.start()
        assert emu.port == port
        assert core.read_namespaced_config_map("a", "shop").metadata.name == "a"
