"""`egress-authz serve`: flags, the ready line, clean stop, worker argv."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from authz.cli import build_parser
from authz.commands import serve

pytestmark = pytest.mark.timeout(30)

POLICY = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: p
  namespace: shop
  labels: {egress-authz.io/policy: "true"}
data:
  policy.yaml: |
    rules: [{name: r, hosts: [api.kadath.io]}]
"""


class TestFlags:
    def test_defaults(self) -> None:
        """The documented defaults (a public contract: README, Helm chart)."""
        a = serve.build_arg_parser().parse_args(["--policies", "/p"])
        assert (a.grpc_address, a.admin_address, a.trust_domain, a.workers, a.workloads) == (
            "127.0.0.1:9000", "127.0.0.1:9090", "cluster.local", 1, None
        )
        assert a.run is serve.run

    def test_every_documented_flag_parses(self) -> None:
        """The chart's argument list dry-parses with the standalone parser."""
        a = serve.build_arg_parser().parse_args([
            "--policies", "/etc/egress-authz/policies", "--grpc-address", "0.0.0.0:9000",
            "--admin-address", "0.0.0.0:9090", "--workloads", "/w", "--trust-domain", "td",
            "--workers", "2", "--threads", "4", "--shutdown-grace", "10",
            "--cluster-namespace", "egress-authz", "--log-level", "debug",
        ])
        assert (a.workers, a.threads, a.shutdown_grace) == (2, 4, 10.0)

    def test_unknown_workloads_flag(self) -> None:
        """--unknown-workloads: deny by default, allow as the documented opt-out, else exit 2."""
        parse = serve.build_arg_parser().parse_args
        assert parse(["--policies", "/p"]).unknown_workloads == "deny"
        assert parse(["--policies", "/p", "--unknown-workloads", "allow"]).unknown_workloads == (
            "allow")
        with pytest.raises(SystemExit) as e:
            parse(["--policies", "/p", "--unknown-workloads", "maybe"])
        assert e.value.code == 2
        # --workers: every serving process gets the opt-out, not only the supervisor
        opted = parse(["--policies", "/p", "--workers", "2", "--grpc-address", "0.0.0.0:9000",
                       "--unknown-workloads", "allow"])
        child = parse(serve.child_argv(opted)(1, 5, -1)[4:])
        assert child.unknown_workloads == "allow"

    def test_kube_source_feeds_the_index_check_reads(self, tmp_path: Path) -> None:
        """The Pod watch of `serve --kube` gets the very index the Check server reads, empty
        as it is at start (it once got a second one: an empty index was falsy)."""
        from authz.workloads import WorkloadIndex

        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
            "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
            "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
            "users: [{name: u, user: {token: t}}]\n"
        )
        args = serve.build_arg_parser().parse_args(
            ["--kube", "--kubeconfig", str(kubeconfig), "--namespace", "egress-authz"])
        index = WorkloadIndex()
        (controller,) = serve.build_policy_sources(args, index)
        assert controller.source.index is index  # type: ignore[attr-defined]
        assert serve.has_pod_source(args)
        assert not serve.has_pod_source(serve.build_arg_parser().parse_args(["--policies", "/p"]))

    def test_registered_with_the_cli(self) -> None:
        """`egress-authz serve` dispatches to this module."""
        a = build_parser().parse_args(["serve", "--policies", "/p"])
        assert a.run is serve.run

    def test_workers_must_be_positive(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--workers 0 is a usage error."""
        with pytest.raises(SystemExit) as e:
            serve.build_arg_parser().parse_args(["--policies", "/p", "--workers", "0"])
        assert e.value.code == 2

    def test_no_source_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without a policy source, exit 2 with a message saying what to give."""
        args = serve.build_arg_parser().parse_args(["--grpc-address", "127.0.0.1:0"])
        assert serve.run(args) == 2
        assert "--policies" in capsys.readouterr().err

    def test_workers_need_a_fixed_port(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Port 0 would give each worker its own port: refused."""
        args = serve.build_arg_parser().parse_args(
            ["--policies", "/p", "--workers", "2", "--grpc-address", "127.0.0.1:0"]
        )
        assert serve.run(args) == 2

    def test_threads_only_with_the_threaded_model(self, caplog: pytest.LogCaptureFixture) -> None:
        """--threads sizes the threaded server (the default model); with --server-model aio
        it still parses but warns that it has no effect."""
        argv = ["--policies", "/p", "--workers", "2", "--grpc-address", "127.0.0.1:0"]
        parse = serve.build_arg_parser().parse_args
        assert parse(argv).server_model == "threads"
        assert serve.run(parse([*argv, "--threads", "4"])) == 2
        assert "--threads" not in caplog.text
        assert serve.run(parse([*argv, "--server-model", "aio", "--threads", "4"])) == 2
        assert "--threads has no effect with --server-model aio" in caplog.text

    def test_worker_argv_round_trips(self) -> None:
        """Workers get the same flags, minus --workers and the admin endpoint (the
        supervisor serves it), plus the fds they report and forward records on."""
        args = serve.build_arg_parser().parse_args([
            "--policies", "/p", "--workloads", "/w", "--workers", "3", "--threads", "2",
            "--grpc-address", "0.0.0.0:9000",
        ])
        argv_for = serve.child_argv(args)
        first = argv_for(0, 9, 11)
        assert first[1:4] == ["-m", "authz", "serve"]
        child = serve.build_arg_parser().parse_args(first[4:])
        assert (child.policies, child.workloads, child.threads, child.grpc_address) == (
            "/p", "/w", 2, "0.0.0.0:9000"
        )
        assert (child.workers, child.worker_index, child.worker_ready_fd) == (1, 0, 9)
        assert (child.admin_address, child.worker_record_fd) == ("", 11)
        other = serve.build_arg_parser().parse_args(argv_for(2, 5, 7)[4:])
        assert (other.admin_address, other.worker_index) == ("", 2)


class TestServe:
    def run_until_ready(
        self, tmp_path: Path, policies: Path, capfd: pytest.CaptureFixture[str], *extra: str
    ) -> str:
        args = serve.build_arg_parser().parse_args([
            "--policies", str(policies), "--grpc-address", "127.0.0.1:0", "--admin-address", "",
            "--shutdown-grace", "0.5", *extra,
        ])
        stop = threading.Event()
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(serve.serve(args, stop)))
        t.start()
        line = ""
        deadline = time.monotonic() + 10
        while "serving Check" not in line and time.monotonic() < deadline:
            time.sleep(0.05)
            line += capfd.readouterr().err
        stop.set()
        t.join(10)
        assert result == [0]
        return line

    def test_ready_line_names_address_and_revision(
        self, tmp_path: Path, capfd: pytest.CaptureFixture[str]
    ) -> None:
        """Once loaded: `egress-authz: serving Check on HOST:PORT (policy revision N)`."""
        (tmp_path / "p.yaml").write_text(POLICY)
        out = self.run_until_ready(tmp_path, tmp_path, capfd)
        assert "egress-authz: serving Check on 127.0.0.1:" in out
        assert "(policy revision 1)" in out

    def test_ready_line_without_policy(
        self, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        """With --wait-for-paths a missing policy path serves (denying everything, not
        ready) and says so."""
        out = self.run_until_ready(tmp_path, tmp_path / "missing", capfd, "--wait-for-paths")
        assert "no policy loaded: denying everything until one is" in out
        assert "does not exist" in caplog.text


class TestMissingPaths:
    @pytest.mark.parametrize("flag", ["--policies", "--workloads"])
    def test_a_path_that_does_not_exist_fails_at_start(
        self, tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A mistyped --policies/--workloads exits 2 naming it, before anything listens."""
        (tmp_path / "p.yaml").write_text(POLICY)
        given = {"--policies": str(tmp_path), "--workloads": None, flag: str(tmp_path / "typo")}
        argv = ["--grpc-address", "127.0.0.1:0", "--admin-address", ""]
        for name, value in given.items():
            if value:
                argv += [name, value]
        assert serve.run(serve.build_arg_parser().parse_args(argv)) == 2
        err = capsys.readouterr().err
        assert f"{flag} {tmp_path / 'typo'}: no such file or directory" in err
        assert "serving Check" not in err


class TestIdentityWiring:
    """What `serve` hands the Check server: the Pod source and --unknown-workloads."""

    PODS = """\
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop}
spec: {serviceAccountName: cart}
status: {phase: Running, podIP: 127.0.0.2}
"""

    def reasons(self, tmp_path: Path, *flags: str) -> dict[str, str]:
        """Serve with `flags` (in a thread), then the reason for cart's certificate from
        its own Pod's address and from an address no Pod has."""
        import grpc

        from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest, CheckResponse
        from authz.envoy.server import CHECK_METHOD
        from authz.testing.envoy import free_port

        (tmp_path / "p.yaml").write_text(POLICY)
        (tmp_path / "pods.yaml").write_text(self.PODS)
        port = free_port()
        args = serve.build_arg_parser().parse_args([
            "--policies", str(tmp_path / "p.yaml"), "--grpc-address", f"127.0.0.1:{port}",
            "--admin-address", "", "--no-decision-log", "--shutdown-grace", "0.5", *flags])
        stop = threading.Event()
        t = threading.Thread(target=serve.serve, args=(args, stop), daemon=True)
        t.start()
        out: dict[str, str] = {}
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                check = channel.unary_unary(CHECK_METHOD)
                for ip in ("127.0.0.2", "127.0.0.9"):
                    r = CheckRequest()
                    r.attributes.source.principal = "spiffe://cluster.local/ns/shop/sa/cart"
                    r.attributes.source.address.socket_address.address = ip
                    r.attributes.destination.address.socket_address.port_value = 443
                    r.attributes.tls_session.sni = "api.kadath.io"
                    # serve listens at once and loads the policy file just after: the
                    # first Checks may find no policy yet (flaked under load).
                    deadline = time.monotonic() + 30
                    while True:
                        body = check(r.SerializeToString(), timeout=10, wait_for_ready=True)
                        out[ip] = CheckResponse.FromString(body).dynamic_metadata.fields[
                            "reason"].string_value
                        if out[ip] != "no-policy" or time.monotonic() > deadline:
                            break
                        time.sleep(0.02)
        finally:
            stop.set()
            t.join(10)
        return out

    def test_default_denies_unknown_sources(self, tmp_path: Path) -> None:
        """--workloads and no opt-out: the certificate only from its own Pod."""
        got = self.reasons(tmp_path, "--workloads", str(tmp_path / "pods.yaml"))
        assert got == {"127.0.0.2": "allowed", "127.0.0.9": "unknown-workload"}

    def test_opt_out_reaches_the_check_server(self, tmp_path: Path) -> None:
        """--unknown-workloads allow is what the Check server applies."""
        got = self.reasons(tmp_path, "--workloads", str(tmp_path / "pods.yaml"),
                           "--unknown-workloads", "allow")
        assert got == {"127.0.0.2": "allowed", "127.0.0.9": "allowed"}

    def test_without_a_pod_source_the_principal_alone(
            self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """No --workloads: nothing to check addresses against, and the log says so."""
        got = self.reasons(tmp_path)
        assert got == {"127.0.0.2": "allowed", "127.0.0.9": "allowed"}
        assert "no Pod source" in caplog.text
