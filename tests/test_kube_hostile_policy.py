"""Hostile policy ConfigMaps against `serve --kube`'s source on the API emulator.

One namespace owner must not be able to slow or stop decisions for everyone
else, and ConfigMaps the service does not serve are never parsed at all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, Replica, emu, policy_cm, replica, rule
from tests.test_yaml_limits import bomb

__all__ = ["emu", "replica"]  # fixtures
pytestmark = pytest.mark.kube

CHILD_TIMEOUT = 60.0
CHILD_MEMORY = 2 << 30  # address space: the Kubernetes client and threads, not the bomb


def run_child(code: str, late: str) -> dict[str, Any]:
    """Run `code` in a child Python; the JSON of its last stdout line. A timeout fails
    the test saying `late`; a crash fails it with the child's stderr."""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{late} within {CHILD_TIMEOUT} s")
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def test_alias_bomb_in_one_namespace_leaves_the_others_served() -> None:
    """The issue's attack in the shipped source: a bomb ConfigMap in `evil` gets a short
    Warning Event, and `shop`'s policy is in force within seconds, in bounded memory.

    Runs in a child process with a memory cap and a timeout, so a regression fails
    here instead of swapping the CI machine."""
    code = textwrap.dedent(f"""
        import json, resource, time
        resource.setrlimit(resource.RLIMIT_AS, ({CHILD_MEMORY}, {CHILD_MEMORY}))
        from tests.kube_emulator import KubeEmulator
        from tests.kube_harness import Replica, policy_cm, rule
        with KubeEmulator(bookmark_interval=0.2) as emu:
            emu.seed(policy_cm("evil", "p", [], text={bomb()!r}),
                     policy_cm("shop", "p", [rule("kadath", "api.kadath.io")]))
            replica = Replica(emu)
            start = time.monotonic()
            ready = replica.start().wait_ready(20)
            took = time.monotonic() - start
            events = emu.wait_for(lambda: emu.events("evil", reason="PolicyInvalid"), timeout=10)
            t0 = time.monotonic()
            allowed = replica.allows("shop", "api.kadath.io")
            decide_s = time.monotonic() - t0
            replica.stop()
            print(json.dumps({{"ready": ready, "took": took, "allowed": allowed,
                               "decide_s": decide_s,
                               "event": events[0]["message"], "errors": replica.errors}}))
    """)
    out = run_child(code, "the Kubernetes source did not get ready")
    assert out["ready"] and out["took"] < 10
    assert out["allowed"] and out["decide_s"] < 0.5
    assert "alias" in out["event"] and len(out["event"]) < 400
    assert all(len(e) < 600 for e in out["errors"])


def test_configmaps_outside_the_namespace_selector_are_not_parsed(
        emu: KubeEmulator, replica: Replica) -> None:
    """With --namespace-selector, a policy ConfigMap in an unselected namespace is never
    parsed (no Event, no error); once its namespace is selected, it is."""
    bad = "rules: {not: a list}"
    emu.seed(
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "shop", "labels": {"egress": "on"}}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}},
        policy_cm("shop", "p", [], text=bad),
        policy_cm("web", "p", [], text=bad),
    )
    assert replica.start(namespace_selector="egress=on").wait_ready(5)
    # shop's Event is the barrier: by then web's ConfigMap has been seen as well.
    emu.wait_for(lambda: emu.events("shop", reason="PolicyInvalid"), timeout=2)
    assert emu.events("web", reason="PolicyInvalid") == []
    assert not any("web/p" in e for e in replica.errors)
    emu.modify("v1", "Namespace", "", "web", lambda o: o["metadata"].setdefault(
        "labels", {}).update(egress="on"))
    emu.wait_for(lambda: emu.events("web", reason="PolicyInvalid"), timeout=2)


def test_cluster_tier_label_outside_service_namespace_is_not_parsed(
        emu: KubeEmulator, replica: Replica) -> None:
    """A namespace owner labelling a ConfigMap as cluster tier gets it refused before its
    YAML is read: the bomb in it costs nothing."""
    emu.seed(policy_cm("evil", "c", [], labels={"egress-authz.io/tier": "cluster"},
                       text=bomb()),
             policy_cm(SVC_NS, "cluster", [], labels={"egress-authz.io/tier": "cluster"},
                       text="deny: [evil.example]\nrules: []"),
             policy_cm("shop", "p", [rule("a", "api.kadath.io")]))
    assert replica.start().wait_ready(5)
    events = emu.wait_for(lambda: emu.events("evil", reason="PolicyInvalid"), timeout=2)
    assert "read only from the service's namespace" in events[0]["message"]
    assert replica.allows("shop", "api.kadath.io")


SERVE_KUBE_CHILD = """
import json, resource, statistics, threading, time
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
import grpc, yaml
from authz.commands.serve import build_arg_parser, serve
from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest, CheckResponse
from authz.envoy.server import CHECK_METHOD
from authz.testing.envoy import free_port
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import SVC_NS, pod, policy_cm, rule

def request(ns):
    r = CheckRequest()
    a = r.attributes
    a.source.principal = "spiffe://cluster.local/ns/" + ns + "/sa/default"
    a.source.address.socket_address.address = "10.0.0.9"
    a.destination.address.socket_address.port_value = 8443
    a.tls_session.sni = "api.kadath.io"
    return r.SerializeToString()

with KubeEmulator(bookmark_interval=0.2) as emu:
    emu.seed(policy_cm("evil", "p", [], text={bomb!r}),
             policy_cm("shop", "p", [rule("kadath", "api.kadath.io")]),
             pod("shop", "cart", "10.0.0.9"))  # the caller: no Pod would be unknown-workload
    kubeconfig = {kubeconfig!r}
    with open(kubeconfig, "w") as f:
        f.write(yaml.safe_dump({{
            "apiVersion": "v1", "kind": "Config", "current-context": "e",
            "clusters": [{{"name": "e", "cluster": {{"server": emu.url}}}}],
            "contexts": [{{"name": "e", "context": {{"cluster": "e", "user": "u"}}}}],
            "users": [{{"name": "u", "user": {{"token": "t"}}}}]}}))
    port = free_port()
    args = build_arg_parser().parse_args([
        "--kube", "--kubeconfig", kubeconfig, "--namespace", SVC_NS, "--no-write",
        "--gateway-port-map", "8443:443", "--grpc-address", "127.0.0.1:%d" % port,
        "--admin-address", "", "--no-decision-log"])
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(args, stop), daemon=True)
    start = time.monotonic()
    t.start()
    channel = grpc.insecure_channel("127.0.0.1:%d" % port)
    check = channel.unary_unary(CHECK_METHOD)

    def code(ns):
        try:
            resp = CheckResponse()
            resp.ParseFromString(check(request(ns), timeout=2))
            return resp.status.code
        except grpc.RpcError:
            return -1

    emu.wait_for(lambda: code("shop") == 0, timeout=20)
    ready = time.monotonic() - start
    times = []
    for _ in range(50):
        t0 = time.monotonic()
        assert code("shop") == 0 and code("evil") == 7
        times.append((time.monotonic() - t0) / 2)
    events = emu.wait_for(lambda: emu.events("evil", reason="PolicyInvalid"), timeout=10)
    # VmHWM: this process image's peak RSS (ru_maxrss would carry the forking
    # parent's peak across exec).
    with open("/proc/self/status") as status:
        hwm = next(line for line in status if line.startswith("VmHWM:"))
    rss_mib = int(hwm.split()[1]) / 1024
    channel.close()
    stop.set()
    t.join(10)
    print(json.dumps({{"ready": ready, "median": statistics.median(times), "rss_mib": rss_mib,
                       "event": events[0]["message"]}}))
"""


def test_serve_kube_with_a_bomb_in_one_namespace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The shipped command (`serve --kube`) on the emulator, with the bomb ConfigMap in
    `evil`: shop's Checks are allowed within seconds and answered in milliseconds, evil's
    denied, the process stays far below the chart's 512 MiB limit, and evil gets a short
    Warning Event. In a child with an address-space cap and a timeout."""
    code = SERVE_KUBE_CHILD.format(memory=3 << 30, bomb=bomb(),
                                   kubeconfig=str(tmp_path / "kubeconfig"))
    out = run_child(code, "serve --kube did not answer")
    assert out["ready"] < 20 and out["median"] < 0.05
    assert out["rss_mib"] < 384, out  # 3/4 of the chart's limit; ~78 MiB measured
    assert "alias" in out["event"] and len(out["event"]) < 400


def test_one_namespace_cannot_grow_the_service_without_bound(
        emu: KubeEmulator, replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-ConfigMap caps do not stop an owner from creating many maximal
    ConfigMaps (about 10 MiB of the service's memory each: 50 take a replica over
    the chart's 512 MiB). Host patterns are therefore also capped per namespace: the
    ConfigMap that would cross the cap is rejected with a PolicyInvalid Event and its
    last good version (or nothing) stays; other namespaces are unaffected, and an
    edit that brings it back under the cap is accepted."""
    import authz.kube.source as source_module

    monkeypatch.setattr(source_module, "MAX_NAMESPACE_HOSTS", 10)
    hosts = [f"h{i}.kadath.io" for i in range(6)]
    emu.seed(policy_cm("evil", "a", [rule("a", *hosts)]),
             policy_cm("shop", "p", [rule("p", *hosts, "api.kadath.io")]))
    assert replica.start().wait_ready(30)
    emu.wait_for(lambda: replica.allows("evil", "h0.kadath.io"), timeout=20)
    emu.seed(policy_cm("evil", "b", [rule("b", "api.leng.com", *hosts)]))
    events = emu.wait_for(lambda: emu.events("evil", reason="PolicyInvalid"), timeout=20)
    assert "evil" in events[0]["message"] and "per namespace" in events[0]["message"]
    assert not replica.allows("evil", "api.leng.com")
    assert replica.allows("evil", "h0.kadath.io")  # ConfigMap a stays in force
    assert replica.allows("shop", "api.kadath.io")  # 7 hosts of its own: under the cap
    emu.modify("v1", "ConfigMap", "evil", "b", lambda o: o["data"].update(
        {"policy.yaml": "rules: [{name: b, hosts: [api.leng.com], ports: [443]}]"}))
    emu.wait_for(lambda: replica.allows("evil", "api.leng.com"), timeout=20)
