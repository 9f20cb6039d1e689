"""The mesh registry: rendering, schema validity, server-side apply, pruning, restoring,
leader election, the permissions table and the 1,000-namespace load."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from authz.gateway_ports import GatewayPorts
from authz.kube.fence import FenceMonitor
from authz.kube.gateway_service import GatewayServiceWatch
from authz.kube.leader import LeaderElector
from authz.kube.permissions import PERMISSIONS, verbs_of
from authz.kube.writer import RegistryWriter
from authz.loader import build_policy_set, load_path
from authz.render import RenderOptions, render
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, Replica, emu, policy_cm, replica, rule, write_kubeconfig
from tests.schemas import requires_istio_schemas, validate_istio

__all__ = ["emu", "replica"]  # fixtures
pytestmark = pytest.mark.kube
SE = ("networking.istio.io/v1", "ServiceEntry")


def ses(emu: KubeEmulator, ns: str) -> dict[str, list[str]]:
    return {o["metadata"]["name"]: o["spec"]["hosts"] for o in emu.list(*SE, ns)}


@pytest.fixture
def writer(emu: KubeEmulator, replica: Replica) -> Iterator[RegistryWriter]:
    replica.start()
    w = RegistryWriter(replica.api(), replica.store, options=RenderOptions(),
                       is_leader=lambda: True, backoff_cap=0.5, watch_timeout=30,
                       metrics=replica.metrics)
    w.start()
    yield w
    w.stop()


class TestRender:
    @requires_istio_schemas
    def test_examples_render_valid_objects(self) -> None:
        """Every object rendered from the examples validates against Istio's CRD schemas."""
        result = load_path("examples")
        assert not result.problems
        objs = render(build_policy_set(result.policies))
        assert {o["kind"] for o in objs} >= {"ServiceEntry", "VirtualService",
                                             "DestinationRule", "Gateway"}
        for o in objs:
            validate_istio(o)

    @requires_istio_schemas
    def test_cluster_deny_never_in_a_service_entry(self, emu: KubeEmulator) -> None:
        """Denied hosts (exact and by wildcard) appear in no ServiceEntry; baseline hosts
        are exported to every namespace; wildcards resolve NONE, exact names DNS."""
        from authz.policy import parse_configmap

        cms = [
            policy_cm("shop", "p", [rule("a", "api.kadath.io", "bad.example", "x.evil.io",
                                         "*.kadath.io", ports=[443, 80])], ),
            policy_cm(SVC_NS, "c", [], labels={"egress-authz.io/tier": "cluster"},
                      text="deny: [bad.example, '*.evil.io']\n"
                           "rules: [{name: base, hosts: [status.io]}]"),
        ]
        for i, cm in enumerate(cms):
            cm["metadata"]["uid"] = f"uid-{i}"
        objs = render(build_policy_set(parse_configmap(c, cluster_namespace=SVC_NS)
                                       for c in cms))
        for o in objs:
            validate_istio(o)
        entries = [o for o in objs if o["kind"] == "ServiceEntry"]
        all_hosts = {h for o in entries for h in o["spec"]["hosts"]}
        assert "bad.example" not in all_hosts and "x.evil.io" not in all_hosts
        assert {"api.kadath.io", "*.kadath.io", "status.io"} <= all_hosts
        for o in entries:
            wild = any(h.startswith("*.") for h in o["spec"]["hosts"])
            assert o["spec"]["resolution"] == ("NONE" if wild else "DNS")
            assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "egress-authz"
            ns = o["metadata"]["namespace"]
            if ns == "istio-egress":  # the gateway's own entries: no owner across namespaces
                assert "ownerReferences" not in o["metadata"] and not wild
            else:
                assert o["metadata"]["ownerReferences"][0]["kind"] == "ConfigMap"
            # Namespaces' entries are their sidecars' alone; the gateway sees its own.
            assert o["spec"]["exportTo"] == (["*"] if ns == SVC_NS else ["."])
        assert {h for o in entries if o["metadata"]["namespace"] == "istio-egress"
                for h in o["spec"]["hosts"]} == {"api.kadath.io", "status.io"}
        shop_dr = next(o for o in objs if o["kind"] == "DestinationRule"
                       and o["metadata"]["namespace"] == "shop")
        assert {s["trafficPolicy"]["tls"]["sni"] for s in shop_dr["spec"]["subsets"]} == {
            "api.kadath.io", "status.io"}

    def test_render_command_prints_yaml(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`egress-authz render --policies PATH` works offline and prints the objects."""
        import yaml

        from authz.cli import main

        assert main(["render", "--policies", "examples", "--gateway-namespace", "gw"]) == 0
        docs = list(yaml.safe_load_all(capsys.readouterr().out))
        assert docs and all(d["apiVersion"] == "networking.istio.io/v1" for d in docs)
        assert any(d["kind"] == "Gateway" and d["metadata"]["namespace"] == "gw" for d in docs)


# Bounds on waits for events: generous, so that a loaded CI machine (2 cores shared)
# never fails them; each wait returns as soon as its condition holds.
WAIT = 20.0
LEASE = 2.0


class TestWriter:
    def test_service_entries_follow_configmaps(self, emu: KubeEmulator, replica: Replica,
                                               writer: RegistryWriter) -> None:
        """Create / change / delete a policy: ServiceEntries follow each change (event
        driven, about 0.1 s when idle; the bounds here only stop a hung test), then prune."""
        assert replica.source is not None and replica.source.wait_ready(30)
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        emu.wait_for(lambda: ses(emu, "shop") == {"egress-authz-dns-443": ["api.kadath.io"]},
                     timeout=WAIT)
        applied = emu.get(*SE, "shop", "egress-authz-dns-443")
        assert applied is not None
        assert [m["manager"] for m in applied["metadata"]["managedFields"]] == ["egress-authz"]
        cm = emu.get("v1", "ConfigMap", "shop", "p")
        assert cm is not None
        assert applied["metadata"]["ownerReferences"][0]["uid"] == cm["metadata"]["uid"]
        emu.modify("v1", "ConfigMap", "shop", "p", lambda o: o["data"].update(
            {"policy.yaml": "rules: [{name: b, hosts: [api.leng.com], ports: [8443]}]"}))
        emu.wait_for(lambda: ses(emu, "shop") == {"egress-authz-dns-8443": ["api.leng.com"]},
                     timeout=WAIT)
        emu.remove("v1", "ConfigMap", "shop", "p")
        emu.wait_for(lambda: not emu.list("networking.istio.io/v1", "VirtualService")
                     and not ses(emu, "shop"), timeout=WAIT)

    def test_failed_writes_are_counted(self, emu: KubeEmulator, replica: Replica,
                                       writer: RegistryWriter) -> None:
        """A write the API refuses counts in egress_authz_registry_write_errors_total (the
        PrometheusRule's EgressAuthzRegistryWriteErrors), and the writer retries."""
        from tests.kube_emulator import ApiError

        def errors() -> float:  # on the replica's own registry, which the writer was given
            return replica.metrics.value("egress_authz_registry_write_errors_total")

        refusing = threading.Event()
        refusing.set()

        def refuse(method: str, path: str) -> None:
            if refusing.is_set() and method == "PATCH" and "/serviceentries/" in path:
                raise ApiError(403, "Forbidden", "serviceentries is forbidden (test)")

        assert errors() == 0  # a fresh registry: nothing another test did shows here
        emu.before_request = refuse
        assert replica.source is not None and replica.source.wait_ready(5)
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        emu.wait_for(lambda: errors() > 0, timeout=5)
        refusing.clear()
        emu.wait_for(lambda: ses(emu, "shop") == {"egress-authz-dns-443": ["api.kadath.io"]},
                     timeout=5)

    def test_hand_edited_service_entry_is_restored(self, emu: KubeEmulator, replica: Replica,
                                                   writer: RegistryWriter) -> None:
        """Someone adds a host by hand, or deletes our object: it is put back."""
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        emu.wait_for(lambda: ses(emu, "shop"), timeout=WAIT)
        emu.modify(*SE, "shop", "egress-authz-dns-443",
                   lambda o: o["spec"]["hosts"].append("evil.example"))
        emu.wait_for(lambda: ses(emu, "shop") == {"egress-authz-dns-443": ["api.kadath.io"]},
                     timeout=WAIT)
        emu.remove(*SE, "shop", "egress-authz-dns-443")
        emu.wait_for(lambda: ses(emu, "shop"), timeout=WAIT)

    def test_unmanaged_objects_are_left_alone(self, emu: KubeEmulator, replica: Replica,
                                              writer: RegistryWriter) -> None:
        """Only objects with our managed-by label are ever pruned."""
        emu.seed({"apiVersion": SE[0], "kind": SE[1],
                  "metadata": {"name": "theirs", "namespace": "shop"},
                  "spec": {"hosts": ["x.example"], "location": "MESH_EXTERNAL",
                           "resolution": "DNS",
                           "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]}},
                 policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        emu.wait_for(lambda: "egress-authz-dns-443" in ses(emu, "shop"), timeout=WAIT)
        assert "theirs" in ses(emu, "shop")


class TestLeaderElection:
    def test_one_holder_writes_and_the_other_takes_over(self, emu: KubeEmulator) -> None:
        """Two replicas: one Lease holder writes; when it stops renewing, the other takes
        over within about a lease duration and starts writing."""
        replicas = [Replica(emu), Replica(emu)]
        electors, writers = [], []
        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        for i, r in enumerate(replicas):
            r.start()
            el = LeaderElector(r.api(), f"replica-{i}", lease_duration=LEASE, renew_interval=0.2)
            w = RegistryWriter(r.api(), r.store, options=RenderOptions(),
                               is_leader=lambda el=el: el.is_leader, backoff_cap=0.5,
                               watch_timeout=30)
            el.on_change = lambda leader, w=w: w.poke() if leader else None
            electors.append(el)
            writers.append(w)
            w.start()
            el.start()
        try:
            emu.wait_for(lambda: sum(e.is_leader for e in electors) == 1, timeout=WAIT)
            emu.wait_for(lambda: ses(emu, "shop"), timeout=WAIT)
            leader = next(i for i, e in enumerate(electors) if e.is_leader)
            other = 1 - leader
            assert writers[other].applied == 0
            lease = emu.get("coordination.k8s.io/v1", "Lease", SVC_NS, "egress-authz")
            assert lease is not None
            assert lease["spec"]["holderIdentity"] == f"replica-{leader}"
            start = time.monotonic()
            electors[leader].stop(release=False)  # a crash: no hand-over
            writers[leader].stop()
            emu.wait_for(lambda: electors[other].is_leader, timeout=WAIT)
            took = time.monotonic() - start
            # The other replica counts the lease from when it last saw a renewal, up to one
            # renew interval (0.2 s) before the crash: never sooner than LEASE - 0.2 s after
            # it (a load-delayed observer only takes over later; no upper bound on speed).
            assert took > LEASE - 0.25
            emu.seed(policy_cm("shop", "p", [rule("a", "api.leng.com")]))
            emu.wait_for(lambda: ses(emu, "shop") == {"egress-authz-dns-443": ["api.leng.com"]},
                         timeout=WAIT)
            # The counter moves after the apply returns: wait for it rather than race it.
            emu.wait_for(lambda: writers[other].applied > 0, timeout=WAIT)
        finally:
            for e in electors:
                e.stop()
            for w in writers:
                w.stop()
            for r in replicas:
                r.stop()


class TestPermissions:
    def test_every_request_is_in_the_table_and_the_table_is_used(
            self, emu: KubeEmulator, replica: Replica) -> None:
        """The emulator's request log, after a run using every feature, matches the table."""
        # Only ConfigMaps in selected namespaces are parsed (and get Events).
        emu.seed({"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": "shop", "labels": {"team": "a"}}},
                 policy_cm("shop", "p", [], text="rules: {bad: 1}"))
        replica.start(namespace_selector="team")
        el = LeaderElector(replica.api(), "me", lease_duration=1.0, renew_interval=0.2)
        el.start()
        fences = FenceMonitor(replica.api(), replica.store, is_leader=lambda: el.is_leader,
                              backoff_cap=0.5, watch_timeout=30)
        w = RegistryWriter(replica.api(), replica.store, options=RenderOptions(),
                           is_leader=lambda: el.is_leader, backoff_cap=0.5, watch_timeout=30,
                           fences=fences.opted_in)
        fences.on_opt_in = w.poke
        el.on_change = lambda leader: w.poke() if leader else None
        fences.start()
        w.start()
        np = ("networking.k8s.io/v1", "NetworkPolicy")
        gateway = GatewayServiceWatch(replica.api(), GatewayPorts(), namespace="istio-egress")
        gateway.start()
        try:
            emu.wait_for(lambda: gateway.reflector.synced.is_set(), timeout=3)
            emu.wait_for(lambda: emu.events("shop"), timeout=3)
            for text in ("rules: []", "rules: {bad: 1}"):  # the same error again: a PATCH
                emu.modify("v1", "ConfigMap", "shop", "p",
                           lambda o, t=text: o["data"].update({"policy.yaml": t}))
            emu.wait_for(lambda: any(e.get("count") == 2 for e in emu.events("shop")), timeout=5)
            emu.seed({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": "shop", "labels": {
                          "team": "a", "egress-authz.io/egress-fence": "true"}}},
                     policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
            emu.wait_for(lambda: ses(emu, "shop") and emu.list(*np, "shop"), timeout=10)
            emu.modify("v1", "Namespace", "", "shop",
                       lambda o: o["metadata"]["labels"].pop("egress-authz.io/egress-fence"))
            emu.remove("v1", "ConfigMap", "shop", "p")
            emu.wait_for(lambda: not ses(emu, "shop") and not emu.list(*np, "shop"), timeout=10)
            time.sleep(0.3)  # a Lease renewal (update) happens
        finally:
            gateway.stop()
            w.stop()
            fences.stop()
            el.stop()
        by_path: dict[tuple[str, str], list[Any]] = {}
        for p in PERMISSIONS:
            base = f"/apis/{p.group}/{p.version}" if p.group else f"/api/{p.version}"
            by_path.setdefault((base, p.resource), []).append(p)
        used: set[tuple[str, str, str, frozenset[str]]] = set()
        for rec in emu.requests:
            parts = rec.path.split("/")
            base = "/".join(parts[:3]) if parts[1] == "api" else "/".join(parts[:4])
            rest = [x for x in rec.path[len(base):].split("/") if x]
            if rest[0] == "namespaces" and len(rest) >= 3:
                rest = rest[2:]
            name = rest[1] if len(rest) > 1 else None
            verbs = verbs_of(rec.method, rec.content_type, collection=len(rest) == 1,
                             watch=rec.query.get("watch") == "true")
            for verb in verbs:
                # As RBAC judges it: a rule with resourceNames grants only those names.
                [perm, *_] = [p for p in by_path[(base, rest[0])] if verb in p.verbs
                              and (not p.names or name in p.names)] or [None]
                assert perm is not None, f"{rec.method} {rec.path} needs {verb}"
                used.add((perm.group, perm.resource, verb, perm.names))
        listed = {(p.group, p.resource, v, p.names) for p in PERMISSIONS for v in p.verbs}
        assert listed == used


class TestScale:
    def test_thousand_namespaces_load_and_render(self, emu: KubeEmulator,
                                                 replica: Replica) -> None:
        """1,000 namespaces x 10 rules: listed, validated, compiled and rendered in bounded
        time (figures in docs/benchmarks.md, "Kubernetes")."""
        rules: list[dict[str, Any]] = []
        for ns in range(1000):
            rules = [rule(f"r{i}", f"api{i}.ns{ns}.example", ports=[443]) for i in range(10)]
            emu.seed(policy_cm(f"ns{ns}", "p", rules))
        start = time.monotonic()
        source = replica.start()
        assert source.wait_ready(30)
        loaded = time.monotonic() - start
        assert replica.allows("ns999", "api9.ns999.example")
        assert replica.store.current is not None
        start = time.monotonic()
        objs = render(replica.store.current.policy_set)
        rendered = time.monotonic() - start
        entries = [o for o in objs if o["kind"] == "ServiceEntry"]
        assert len([o for o in entries if o["metadata"]["namespace"] != "istio-egress"]) == 1000
        # The gateway's own entry lists every host, once.
        [gw_entry] = [o for o in entries if o["metadata"]["namespace"] == "istio-egress"]
        assert len(gw_entry["spec"]["hosts"]) == 10_000
        print(f"\nkube scale: load {loaded:.2f}s, render {rendered:.2f}s, {len(objs)} objects")
        assert loaded < 20 and rendered < 10


class TestServeKube:
    def test_serve_kube_against_the_emulator(self, emu: KubeEmulator, tmp_path: Any) -> None:
        """`serve --kube --kubeconfig ...` loads the policies, writes the registry, and hands
        the Lease back on shutdown."""
        import threading

        from authz.commands.serve import build_arg_parser, serve

        emu.seed(policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
        args = build_arg_parser().parse_args([
            "--kube", "--kubeconfig", str(kubeconfig), "--namespace", SVC_NS,
            "--grpc-address", "127.0.0.1:0", "--admin-address", ""])
        stop = threading.Event()
        t = threading.Thread(target=serve, args=(args, stop), daemon=True)
        t.start()
        try:
            emu.wait_for(lambda: ses(emu, "shop") == {"egress-authz-dns-443": ["api.kadath.io"]},
                         timeout=10)
        finally:
            stop.set()
            t.join(10)
        lease = emu.get("coordination.k8s.io/v1", "Lease", SVC_NS, "egress-authz")
        assert lease is not None and not lease["spec"].get("holderIdentity")
