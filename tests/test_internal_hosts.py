"""Namespace policies cannot open cluster-internal or special-use names (SSRF).

Through the egress gateway a rule naming `kubernetes.default.svc.cluster.local`,
`metadata.google.internal` or `printer.local` makes the gateway call an in-cluster or
cloud-internal endpoint for the workload, from the gateway's own network position: a
confused deputy. Such hosts are refused in namespace policies with a located error
(the ConfigMap is reported and its last good version stays); the cluster tier may
allow them with `allowInternalHosts: true`. Checked in the pure parser, in file mode,
in `serve --kube` on the API emulator, through `lint`, `check`, `render` and `import`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from authz import hosts
from authz.cli import main
from authz.engine import decide
from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckResponse
from authz.envoy.server import CHECK_METHOD
from authz.model import Destination, Identity, Protocol, Reason
from authz.observe.metrics import Metrics
from authz.policy import PolicyError, parse_configmap
from authz.sources import DirectorySource
from authz.store import PolicyStore
from authz.testing.envoy import free_port
from tests.import_helpers import Judge, import_objects, lint_output, outcome_of
from tests.kube_emulator import KubeEmulator
from tests.kube_harness import (
    SVC_NS,
    Replica,
    emu,
    pod,
    policy_cm,
    replica,
    rule,
    write_kubeconfig,
)
from tests.test_traces_cli import check_request

__all__ = ["emu", "replica"]  # fixtures

pytestmark = pytest.mark.timeout(60)

OPT_IN = "allowInternalHosts"

# Each name (exact and as a wildcard) that reaches something inside the cluster, the
# cloud or the gateway's own network, never the public internet.
INTERNAL = [
    # the cluster DNS domain and Kubernetes service names short of it
    "kubernetes.default.svc.cluster.local", "*.svc.cluster.local", "*.cluster.local",
    "cluster.local", "kubernetes.default.svc", "*.shop.svc", "api.shop.svc",
    # the resolver's search path completes names under a namespace or single labels
    "kubernetes.default", "*.default", "metadata", "instance-data", "kubernetes",
    # cloud metadata
    "metadata.google.internal", "*.google.internal", "instance-data.ec2.internal",
    # IANA special-use and common private names
    "printer.local", "*.local", "nas.home.arpa", "*.home.arpa", "1.0.0.10.in-addr.arpa",
    "*.in-addr.arpa", "*.ip6.arpa", "x.invalid", "abcdefgh.onion", "*.onion", "x.alt",
    "wiki.intranet", "nas.lan", "git.corp", "*.corp", "db.private",
    # spelling does not help: case, a trailing dot, Unicode
    "Metadata.Google.Internal.", "KUBERNETES.default.SVC.cluster.local",
]
# Names that stay allowed: public hosts, and documentation/test names that never
# resolve publicly (RFC 2606), whatever their labels look like.
PUBLIC = [
    "api.kadath.io", "*.kadath.io", "api.kadath.example", "*.kadath.example", "x.cart.test",
    "*.cart.test", "svc.kadath.io", "cluster.local.kadath.io", "metadata.kadath.io",
    "internal.example.com", "local.kadath.io", "kubernetes.io", "*.arpa-fan.com",
]


def configmap(body: str, *, cluster: bool = False, name: str = "p") -> dict[str, Any]:
    labels = {"egress-authz.io/tier": "cluster"} if cluster else {"egress-authz.io/policy": "true"}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": SVC_NS if cluster else "shop",
                         "labels": labels},
            "data": {"policy.yaml": body}}


def one_rule(host: str, *, extra: str = "") -> str:
    return extra + yaml.safe_dump({"rules": [{"name": "r", "hosts": ["api.kadath.io", host]}]})


def problems(body: str, *, cluster: bool = False, **kw: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_configmap(configmap(body, cluster=cluster), cluster_namespace=SVC_NS, **kw)
    return info.value.problems


class TestNamespaceTier:
    @pytest.mark.parametrize("host", INTERNAL)
    def test_internal_host_refused(self, host: str) -> None:
        """Each internal name is one located error naming the host, saying why, and
        saying that a cluster admin can allow it."""
        (msg,) = problems(one_rule(host))
        assert msg.startswith(f'shop/p rules[0] "r" hosts[1]: "{host}"'), msg
        assert "internal" in msg or "special-use" in msg
        assert f"{OPT_IN}: true" in msg and "cluster admin" in msg

    @pytest.mark.parametrize("host", PUBLIC)
    def test_public_hosts_accepted(self, host: str) -> None:
        """Names outside the internal suffixes, including `example` and `test` names and
        internal-looking labels under a public domain, stay allowed."""
        policy = parse_configmap(configmap(one_rule(host)), cluster_namespace=SVC_NS)
        assert policy.rules[0].hosts[-1] == hosts.parse_pattern(host)

    def test_every_internal_host_reported_at_once(self) -> None:
        """A ConfigMap naming several internal hosts gets one line for each."""
        body = yaml.safe_dump({"rules": [
            {"name": "a", "hosts": ["metadata", "api.kadath.io"]},
            {"name": "b", "hosts": ["kubernetes.default.svc.cluster.local", "x.local"]}]})
        msgs = problems(body)
        assert [m.split(":")[0] for m in msgs] == [
            'shop/p rules[0] "a" hosts[0]', 'shop/p rules[1] "b" hosts[0]',
            'shop/p rules[1] "b" hosts[1]']

    def test_configured_cluster_domain(self) -> None:
        """With another cluster domain, names under it are refused, and so is a wildcard
        that would cover it; cluster.local stays refused (under `local`)."""
        domain = {"cluster_domain": "k8s.corp.example.net"}
        (msg,) = problems(one_rule("api.shop.svc.k8s.corp.example.net"), **domain)
        assert "cluster DNS domain k8s.corp.example.net" in msg
        (msg,) = problems(one_rule("*.corp.example.net"), **domain)
        assert "k8s.corp.example.net" in msg
        problems(one_rule("kubernetes.default.svc.cluster.local"), **domain)
        # The default domain does not know k8s.corp.example.net: a public-looking name.
        parse_configmap(configmap(one_rule("api.shop.svc.k8s.corp.example.net")),
                        cluster_namespace=SVC_NS)

    def test_namespace_cannot_opt_in(self) -> None:
        """The opt-in exists only in the cluster policy."""
        msgs = problems(one_rule("metadata.google.internal", extra=f"{OPT_IN}: true\n"))
        assert any(OPT_IN in m and "cluster policy" in m for m in msgs)
        assert any("metadata.google.internal" in m for m in msgs)


class TestClusterTier:
    def test_refused_without_opt_in(self) -> None:
        """The cluster tier's allow rules are held to the same rule by default, and the
        error says which key lifts it."""
        (msg,) = problems(one_rule("metadata.google.internal"), cluster=True)
        assert f"set {OPT_IN}: true in this cluster policy" in msg

    def test_opt_in(self) -> None:
        """`allowInternalHosts: true` lets the cluster policy's rules name internal hosts."""
        policy = parse_configmap(
            configmap(one_rule("*.svc.cluster.local", extra=f"{OPT_IN}: true\n"), cluster=True),
            cluster_namespace=SVC_NS)
        assert policy.rules[0].hosts == ("api.kadath.io", "*.svc.cluster.local")

    def test_opt_in_must_be_boolean(self) -> None:
        """A mistyped opt-in is an error, not a silent yes."""
        msgs = problems(f"{OPT_IN}: 'yes'\nrules: []", cluster=True)
        assert any(OPT_IN in m and "must be true or false" in m for m in msgs)

    def test_deny_may_name_internal_hosts(self) -> None:
        """Denying internal names narrows access: no opt-in needed."""
        policy = parse_configmap(
            configmap("deny: [metadata.google.internal, '*.svc.cluster.local', metadata]\n"
                      "rules: []", cluster=True), cluster_namespace=SVC_NS)
        assert policy.deny == ("metadata.google.internal", "*.svc.cluster.local", "metadata")


# --- The same scenario in both shipped sources -------------------------------------

GOOD = [rule("kadath", "api.kadath.io")]
EVIL = [rule("kadath", "api.kadath.io"),
        rule("metadata", "metadata.google.internal", "kubernetes.default.svc.cluster.local")]


class FileWorld:
    """A policy directory served by the DirectorySource (`serve --policies`)."""

    def __init__(self, path: Path) -> None:
        self.path, self.store, self.errors = path, PolicyStore(freeze_gc=False), []
        self.source = DirectorySource(path, cluster_namespace=SVC_NS, metrics=Metrics(),
                                      interval=0.05)

    def put(self, name: str, rules: list[dict[str, Any]]) -> None:
        (self.path / f"{name}.yaml").write_text(yaml.safe_dump(policy_cm("shop", name, rules)))

    def start(self) -> None:
        self.source.start(self.store, self.errors.append)

    def reported(self, fragment: str) -> list[str]:
        return [e for e in self.errors if fragment in e]

    def decide(self, host: str) -> Reason:
        assert self.store.current is not None, "no policy loaded"
        return decide(self.store.current, Identity("spiffe://cluster.local/ns/shop/sa/cart"),
                      Destination(port=443, protocol=Protocol.TLS, sni=host)).reason

    def stop(self) -> None:
        self.source.stop()


class KubeWorld:
    """Policy ConfigMaps on the API emulator, read by the Kubernetes source."""

    def __init__(self, emu: KubeEmulator, replica: Replica) -> None:
        self.emu, self.replica = emu, replica

    def put(self, name: str, rules: list[dict[str, Any]]) -> None:
        self.emu.seed(policy_cm("shop", name, rules))

    def start(self) -> None:
        assert self.replica.start().wait_ready(10)

    def reported(self, fragment: str) -> list[str]:
        return [e["message"] for e in self.emu.events("shop", reason="PolicyInvalid")
                if fragment in e["message"]]

    def decide(self, host: str) -> Reason:
        return self.replica.decide("shop", host).reason

    def stop(self) -> None:
        self.replica.stop()


@pytest.fixture(params=["file", "kube"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FileWorld | KubeWorld]:
    if request.param == "file":
        w: FileWorld | KubeWorld = FileWorld(tmp_path)
    else:
        w = KubeWorld(request.getfixturevalue("emu"), request.getfixturevalue("replica"))
    yield w
    w.stop()


def wait_until(predicate: Any, what: str) -> Any:
    done = threading.Event()
    for _ in range(500):  # at most 5 s, checked every 10 ms
        if value := predicate():
            return value
        done.wait(0.01)
    pytest.fail(f"{what} within 5 s")


def test_edit_adding_internal_hosts_is_reported_and_last_good_stays(
        world: FileWorld | KubeWorld) -> None:
    """The attack on a running service: the owner edits a good ConfigMap to allow
    internal hosts. The edit is reported with its location (an error in file mode, a
    PolicyInvalid Event in Kubernetes), the last good version stays in force, and a
    Check for the internal hosts is denied: no rule allows them."""
    world.put("p", GOOD)
    world.start()
    assert world.decide("api.kadath.io") is Reason.ALLOWED
    world.put("p", EVIL)
    (msg, *_) = wait_until(lambda: world.reported('rules[1] "metadata" hosts[0]'),
                           "the edit reported")
    assert "shop/p" in msg and "metadata.google.internal" in msg and OPT_IN in msg
    assert world.decide("api.kadath.io") is Reason.ALLOWED
    assert world.decide("metadata.google.internal") is Reason.HOST_NOT_ALLOWED
    assert world.decide("kubernetes.default.svc.cluster.local") is Reason.HOST_NOT_ALLOWED


def test_offloaded_parse_uses_the_cluster_domain(tmp_path: Path) -> None:
    """A large policy file is parsed in a child process (authz.offload): the child
    refuses hosts under the configured cluster domain too."""
    from authz.offload import load_file

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy_cm("shop", "p", [rule("r", "db.shop.svc.k8s.example")])))
    assert load_file(path, cluster_namespace=SVC_NS, min_bytes=0).problems == []
    result = load_file(path, cluster_namespace=SVC_NS, cluster_domain="k8s.example", min_bytes=0)
    (problem,) = result.problems
    assert "cluster DNS domain k8s.example" in problem


# --- The commands -----------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, *objs: dict[str, Any]) -> str:
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all(list(objs)))
    return str(tmp_path)


def cluster_cm(body: str) -> dict[str, Any]:
    return policy_cm(SVC_NS, "cluster", [], labels={"egress-authz.io/tier": "cluster"},
                     text=body)


class TestCommands:
    def test_lint_refuses(self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """`lint` exits 2 and prints the located error with the opt-in hint."""
        path = write(tmp_path, policy_cm("shop", "p", EVIL))
        code, _, err = cli(capsys, "lint", path)
        assert code == 2
        assert 'shop/p rules[1] "metadata" hosts[0]: "metadata.google.internal"' in err
        assert OPT_IN in err

    def test_lint_cluster_domain(self, capsys: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
        """`lint --cluster-domain` refuses names under that domain (and only then)."""
        path = write(tmp_path, policy_cm("shop", "p", [rule("r", "db.shop.svc.k8s.example.net")]))
        assert cli(capsys, "lint", path)[0] == 0
        code, _, err = cli(capsys, "lint", path, "--cluster-domain", "k8s.example.net")
        assert code == 2 and "cluster DNS domain k8s.example.net" in err
        code, _, err = cli(capsys, "lint", path, "--cluster-domain", "not a domain")
        assert code == 2 and "--cluster-domain" in err

    def test_check_and_render_refuse(self, capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
        """`check` and `render` load through the same parser: policy errors, exit 2."""
        path = write(tmp_path, policy_cm("shop", "p", EVIL))
        code, _, err = cli(capsys, "check", "--policies", path, "--principal",
                           "spiffe://cluster.local/ns/shop/sa/cart",
                           "--host", "metadata.google.internal")
        assert code == 2 and "metadata.google.internal" in err
        code, out, err = cli(capsys, "render", "--policies", path)
        assert code == 2 and out == "" and "metadata.google.internal" in err

    def test_render_names_the_gateway_in_the_cluster_domain(
            self, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
        """`render --cluster-domain` routes to the gateway Service by its name in that
        domain (as `serve --kube --cluster-domain` writes it), never under cluster.local."""
        path = write(tmp_path, policy_cm("shop", "p", GOOD))
        code, out, err = cli(capsys, "render", "--policies", path,
                             "--cluster-domain", "k8s.example.net")
        assert code == 0, err
        assert "istio-egressgateway.istio-egress.svc.k8s.example.net" in out
        assert "cluster.local" not in out

    def test_cluster_opt_in_through_check(self, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
        """With the cluster opt-in, a cluster rule may name an internal host and `check`
        allows it; a namespace rule still may not."""
        body = f"{OPT_IN}: true\n" + yaml.safe_dump(
            {"rules": [{"name": "dns", "hosts": ["resolver.corp"]}]})
        ask = ["check", "--principal", "spiffe://cluster.local/ns/shop/sa/cart",
               "--host", "resolver.corp", "-o", "json"]
        path = write(tmp_path, cluster_cm(body), policy_cm("shop", "p", GOOD))
        code, out, err = cli(capsys, *ask, "--policies", path)
        assert code == 0, err
        assert json.loads(out)["rule"] == "egress-authz/cluster/dns"
        path = write(tmp_path, cluster_cm(body),
                     policy_cm("shop", "p", [rule("dns", "resolver.corp")]))
        code, _, err = cli(capsys, *ask, "--policies", path)
        assert code == 2 and 'shop/p rules[0] "dns" hosts[0]: "resolver.corp"' in err

    def test_import_reports_internal_hosts(self, capsys: pytest.CaptureFixture[str],
                                           tmp_path: Path) -> None:
        """An imported allowlist naming internal hosts keeps the public ones, reports
        the rest, and what it prints passes `lint`."""
        conf = ("acl a dstdomain api.kadath.io metadata.google.internal .svc.cluster.local\n"
                "acl b dstdomain kubernetes.default\n"
                "http_access allow a\nhttp_access allow b\nhttp_access deny all\n")
        result = import_objects("squid", {"squid.conf": conf}, namespace="shop")
        assert outcome_of(result, "allow a") == "narrower"
        assert outcome_of(result, "allow b") == "not-translatable"
        reasons = " ".join(n.reason or "" for n in result.notes)
        assert "metadata.google.internal" in reasons and OPT_IN in reasons
        judge = Judge(result)
        assert judge.allows("api.kadath.io", 443)
        assert not judge.allows("metadata.google.internal", 443)
        assert not judge.allows("kubernetes.default.svc.cluster.local", 443)
        lint_output(result, tmp_path, capsys)

    def test_suggest_leaves_internal_hosts_out(self) -> None:
        """`suggest` never proposes a rule the parser would refuse: internal hosts a
        namespace was denied are listed in a comment instead, even where two share a
        parent that --wildcards would fold; the suggestion loads."""
        from tests.test_suggest import seen, suggested

        decisions = [seen("cart", h, 443, "TLS") for h in (
            "api.kadath.io", "metadata.google.internal", "a.db.corp", "b.db.corp",
            "db.shop.svc.k8s.example.net")]
        text, result = suggested(decisions, wildcards=True, cluster_domain="k8s.example.net")
        (policy,) = result.policies
        assert [r.hosts for r in policy.rules] == [("api.kadath.io",)]
        for host in ("metadata.google.internal", "a.db.corp", "db.shop.svc.k8s.example.net"):
            assert f"allowInternalHosts): 1 x {host}" in text

    def test_explain_does_not_propose_a_refused_rule(self) -> None:
        """`explain` on a denial of an internal host says who can allow it instead of
        offering a namespace rule the parser would refuse; other hosts keep the snippet."""
        from authz.commands.explain import explanation

        base = {"verdict": "deny", "reason": "host-not-allowed", "namespace": "shop",
                "service_account": "cart", "port": 443, "protocol": "TLS"}
        fix = explanation({**base, "host": "metadata.google.internal"})["fix"]
        assert not [f for f in fix if f["kind"] == "code"]
        assert any("allowInternalHosts" in f["text"] for f in fix)
        fix = explanation({**base, "host": "api.kadath.io"})["fix"]
        assert any(f["kind"] == "code" and "api.kadath.io" in f["text"] for f in fix)


def test_chart_cluster_domain_reaches_the_kube_source_and_writer(tmp_path: Path) -> None:
    """The chart's clusterDomain, through the Deployment's args and `serve --kube`'s
    parser, is what the policy source refuses under and what the writer renders with."""
    import helm_python as helm

    from authz.commands.serve import build_arg_parser
    from authz.kube.controller import KubeController
    from authz.workloads import WorkloadIndex

    root = Path(__file__).resolve().parents[1]
    with helm.Chart.load(root / "charts" / "egress-authz") as chart:
        manifests = chart.render(name="egress-authz", namespace=SVC_NS,
                                 values={"clusterDomain": "k8s.example.net"})
    (deploy,) = [d for path, text in manifests.items() if not path.endswith("NOTES.txt")
                 for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment"]
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9")
    parsed = build_arg_parser().parse_args([*args[1:], "--kubeconfig", str(kubeconfig)])
    controller = KubeController.from_args(parsed, WorkloadIndex())
    assert controller.source.settings.cluster_domain == "k8s.example.net"
    assert controller.writer is not None
    assert controller.writer.options.gateway_host.endswith(".svc.k8s.example.net")


def test_serve_kube_refuses_and_denies(emu: KubeEmulator, tmp_path: Path) -> None:
    """The shipped command (`serve --kube --cluster-domain`) on the emulator: the owner's
    ConfigMap naming internal hosts gets a PolicyInvalid Event, the other ConfigMap of
    the namespace is served, and Checks for the internal hosts are denied."""
    from authz.commands.serve import build_arg_parser, serve

    emu.seed(policy_cm("shop", "good", GOOD),
             policy_cm("shop", "evil", [rule("m", "metadata.google.internal"),
                                        rule("k", "db.shop.svc.k8s.example.net")]),
             pod("shop", "cart", "10.0.0.9", sa="cart"))
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", emu.url)
    port = free_port()
    args = build_arg_parser().parse_args([
        "--kube", "--kubeconfig", str(kubeconfig), "--namespace", SVC_NS, "--no-write",
        "--gateway-port-map", "8443:443", "--grpc-address", f"127.0.0.1:{port}",
        "--admin-address", "", "--no-decision-log", "--cluster-domain", "k8s.example.net"])
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(args, stop), daemon=True)
    t.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    check = channel.unary_unary(CHECK_METHOD)

    def code(host: str) -> int:
        try:
            resp = CheckResponse()
            resp.ParseFromString(check(check_request(
                principal="spiffe://cluster.local/ns/shop/sa/cart", source_ip="10.0.0.9",
                sni=host, port=8443), timeout=2))
            return int(resp.status.code)
        except grpc.RpcError:
            return -1  # not serving yet

    try:
        emu.wait_for(lambda: code("api.kadath.io") == 0, timeout=20)
        (event,) = emu.wait_for(lambda: emu.events("shop", involved="evil",
                                                   reason="PolicyInvalid"), timeout=10)
        assert "metadata.google.internal" in event["message"]
        assert "k8s.example.net" in event["message"]
        assert code("metadata.google.internal") == 7
        assert code("db.shop.svc.k8s.example.net") == 7
    finally:
        channel.close()
        stop.set()
        t.join(10)
