"""The registry writer never lets a host exist in the mesh without its route to the gateway,
not even between two writes: every state the emulator went through passes Istio's rules."""

from __future__ import annotations

from typing import Any

import pytest

from authz.kube.writer import RegistryWriter
from authz.render import RenderOptions
from tests.istio_rules import check
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, Replica, emu, policy_cm, replica, rule

__all__ = ["emu", "replica"]  # fixtures
pytestmark = pytest.mark.kube
ISTIO_KINDS = {"ServiceEntry", "VirtualService", "DestinationRule", "Gateway"}


def replay(emu: KubeEmulator) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each Istio write in order, with the set of Istio objects right after it."""
    state: dict[tuple[str, str, str], dict[str, Any]] = {}
    out = []
    for type_, obj in emu.changes():
        if obj["kind"] not in ISTIO_KINDS:
            continue
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        if type_ == "DELETED":
            state.pop(key, None)
        else:
            state[key] = obj
        out.append((f"{type_} {key}", list(state.values())))
    return out


def hosts_in_registry(emu: KubeEmulator) -> set[str]:
    return {h for o in emu.list("networking.istio.io/v1", "ServiceEntry")
            for h in o["spec"]["hosts"]}


class TestWriteOrder:
    def test_every_intermediate_state_routes_every_host(
            self, emu: KubeEmulator, replica: Replica,
            chart_gateways: list[dict[str, Any]]) -> None:
        """Add hosts, swap them, change ports, add and drop the cluster tier, delete the
        policy: after every single write, each dialable host has its VirtualService, its
        subset where the sidecar looks, and its gateway server."""
        replica.start()
        writer = RegistryWriter(replica.api(), replica.store, options=RenderOptions(),
                                is_leader=lambda: True, backoff_cap=0.5, watch_timeout=30)
        writer.start()
        try:
            steps: list[tuple[list[dict[str, Any]], set[str]]] = [
                ([policy_cm("shop", "p", [rule("a", "api.kadath.io", "api.leng.com")])],
                 {"api.kadath.io", "api.leng.com"}),
                ([policy_cm("shop", "p", [rule("a", "api.leng.com", "my-api.example.com",
                                               "my.api-example.com")])],
                 {"api.leng.com", "my-api.example.com", "my.api-example.com"}),
                ([policy_cm("shop", "p", [rule("a", "api.leng.com", ports=[443, 8443])]),
                  policy_cm(SVC_NS, "c", [], labels={"egress-authz.io/tier": "cluster"},
                            text="rules: [{name: base, hosts: [status.io]}]")],
                 {"api.leng.com", "status.io"}),
                ([policy_cm("billing", "p", [rule("b", "status.io", ports=[8443])])],
                 {"api.leng.com", "status.io"}),
            ]
            for objs, want in steps:
                emu.seed(*objs)
                emu.wait_for(lambda want=want: hosts_in_registry(emu) == want, timeout=10)
            emu.remove("v1", "ConfigMap", "shop", "p")
            emu.remove("v1", "ConfigMap", "billing", "p")
            emu.remove("v1", "ConfigMap", SVC_NS, "c")
            emu.wait_for(lambda: not any(emu.list("networking.istio.io/v1", k)
                                         for k in ISTIO_KINDS), timeout=10)
        finally:
            writer.stop()
        history = replay(emu)
        assert len(history) > 15  # the scenario really went through many writes
        for write, state in history:
            problems = check(state, installed=chart_gateways, namespaces=["no-policy"])
            assert not problems, f"after {write}:\n" + "\n".join(problems)

    def test_apply_order_in_the_request_log(self, emu: KubeEmulator, replica: Replica) -> None:
        """The API sees routes before the ServiceEntry that admits their host, and on removal
        the ServiceEntry before the routes."""
        replica.start()
        writer = RegistryWriter(replica.api(), replica.store, options=RenderOptions(),
                                is_leader=lambda: True, backoff_cap=0.5, watch_timeout=30)
        writer.start()
        try:
            emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
            emu.wait_for(lambda: hosts_in_registry(emu) == {"api.kadath.io"}, timeout=10)
            emu.remove("v1", "ConfigMap", "shop", "p")
            emu.wait_for(lambda: not any(emu.list("networking.istio.io/v1", k)
                                         for k in ISTIO_KINDS), timeout=10)
        finally:
            writer.stop()
        writes = [(r.method, r.path.split("/")[-2]) for r in emu.requests
                  if r.method in ("PATCH", "DELETE") and "networking.istio.io" in r.path]
        applied = [kind for method, kind in writes if method == "PATCH"]
        deleted = [kind for method, kind in writes if method == "DELETE"]
        # A loaded machine may re-apply an object whose watch event is late (idempotent):
        # the order of first writes is what makes the host safe.
        first_applied = list(dict.fromkeys(applied))
        assert first_applied == ["destinationrules", "virtualservices", "gateways",
                                 "serviceentries"]
        assert list(dict.fromkeys(deleted)) == ["serviceentries", "gateways", "virtualservices",
                                                "destinationrules"]
