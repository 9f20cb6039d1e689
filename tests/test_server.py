"""authz.envoy.server and `serve`: Check over a real gRPC channel on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest, CheckResponse
from authz.envoy.request import MAX_HEADERS
from authz.envoy.server import (
    CHECK_METHOD,
    SERVICE_NAME,
    AuthzServer,
    ServerSettings,
    ThreadedAuthzServer,
)
from authz.observe.metrics import Metrics
from authz.observe.recorder import DecisionRecorder, TracingSettings
from authz.records import DecisionRecord
from authz.sources import DirectorySource, WorkloadFileSource
from authz.store import PolicyStore
from authz.workloads import WorkloadIndex

ROOT = Path(__file__).resolve().parents[1]
CART = "spiffe://cluster.local/ns/shop/sa/cart"

pytestmark = pytest.mark.timeout(60)


def policy_yaml(hosts: list[str], name: str = "egress-policy", extra_rule: str = "") -> str:
    listed = ", ".join(json.dumps(h) for h in hosts)
    return f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}
  namespace: shop
  labels: {{egress-authz.io/policy: "true"}}
data:
  policy.yaml: |
    rules:
      - name: cart
        workloads: {{serviceAccounts: [cart]}}
        hosts: [{listed}]
{extra_rule}"""


FINANCE_RULE = """\
      - name: finance
        workloads: {matchLabels: {function: finance}}
        hosts: [ledger.kadath.io]
"""

PODS = """\
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata: {name: cart-finance, namespace: shop, labels: {function: finance}}
    spec: {serviceAccountName: cart}
    status: {phase: Running, podIP: 127.0.0.2}
  - apiVersion: v1
    kind: Pod
    metadata: {name: cart-web, namespace: shop, labels: {function: web}}
    spec: {serviceAccountName: cart}
    status: {phase: Running, podIP: 127.0.0.3}
  - apiVersion: v1
    kind: Pod
    metadata: {name: frontend, namespace: shop}
    spec: {serviceAccountName: frontend}
    status: {phase: Running, podIP: 127.0.0.4}
  - apiVersion: v1
    kind: Pod
    metadata: {name: cart-plain, namespace: shop}
    spec: {serviceAccountName: cart}
    status: {phase: Running, podIP: 10.0.0.1}
  - apiVersion: v1
    kind: Pod
    metadata: {name: cart-dual, namespace: shop, labels: {function: finance}}
    spec: {serviceAccountName: cart}
    status:
      phase: Running
      podIP: 10.0.0.2
      podIPs: [{ip: 10.0.0.2}, {ip: "FD00:0:0:0:0:0:0:7"}]
"""


def check_request(
    sni: str | None = "api.kadath.io", *, host: str | None = None, source_ip: str = "10.0.0.1",
    principal: str = CART,
) -> bytes:
    r = CheckRequest()
    a = r.attributes
    a.source.principal = principal
    a.source.address.socket_address.address = source_ip
    a.destination.address.socket_address.port_value = 443
    if sni:
        a.tls_session.sni = sni
    if host:
        a.request.http.host = host
        a.request.http.method = "GET"
        a.request.http.path = "/"
    return r.SerializeToString()


class Client:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._check = self.channel.unary_unary(CHECK_METHOD)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def check(self, data: bytes, timeout: float = 5) -> CheckResponse:
        return CheckResponse.FromString(self._check(data, timeout=timeout))

    def reason(self, data: bytes) -> str:
        return self.check(data).dynamic_metadata.fields["reason"].string_value

    def serving(self, service: str = "") -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return self.health.Check(request, timeout=5).status

    def close(self) -> None:
        self.channel.close()


class Recording:
    def __init__(self, delay: float = 0.0) -> None:
        self.records: list[DecisionRecord] = []
        self.delay = delay

    def record(self, record: DecisionRecord) -> None:
        time.sleep(self.delay)
        self.records.append(record)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    (d / "shop.yaml").write_text(policy_yaml(["api.kadath.io"], extra_rule=FINANCE_RULE))
    return d


# Both serving models `serve --server-model` offers.
MODELS = pytest.mark.parametrize("model", [AuthzServer, ThreadedAuthzServer],
                                 ids=["aio", "threads"])


@pytest.fixture(params=[AuthzServer, ThreadedAuthzServer], ids=["aio", "threads"])
def running(policies: Path, tmp_path: Path, request: pytest.FixtureRequest
            ) -> Iterator[tuple[AuthzServer, Client, Recording]]:
    (tmp_path / "pods.yaml").write_text(PODS)
    store = PolicyStore()
    index = WorkloadIndex()
    recorder = Recording()
    server = request.param(store, index, recorder, ServerSettings(address="127.0.0.1:0"))
    port = server.start()
    workloads = WorkloadFileSource(tmp_path / "pods.yaml", index)
    workloads.start(on_error=print)
    source = DirectorySource(policies)
    source.start(store, on_error=print)
    client = Client(port)
    yield server, client, recorder
    client.close()
    source.stop()
    workloads.stop()
    server.stop(0)


def wait_for(predicate, timeout: float = 2.0) -> float:
    """Seconds until predicate() held; fails after timeout."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - t0


class TestCheck:
    def test_allow_and_deny(self, running) -> None:
        """Allowed SNI gets OK; another host PERMISSION_DENIED with its reason."""
        _, client, _ = running
        assert client.check(check_request("api.kadath.io")).status.code == 0
        denied = client.check(check_request("evil.example"))
        assert denied.status.code == 7
        assert denied.dynamic_metadata.fields["reason"].string_value == "host-not-allowed"

    def test_garbage_is_a_deny_not_an_rpc_error(self, running) -> None:
        """A malformed body is answered with a bad-request CheckResponse; serving goes on."""
        _, client, _ = running
        r = client.check(b"\xff\x00garbage")
        assert r.status.code == 7 and r.denied_response.status.code == 403
        assert json.loads(r.denied_response.body)["reason"] == "bad-request"
        assert client.check(check_request()).status.code == 0

    def test_absurd_sizes(self, running) -> None:
        """Too many headers: bad-request; over gRPC's limit: refused by gRPC; both deny."""
        _, client, _ = running
        r = CheckRequest.FromString(check_request(host="api.kadath.io"))
        for i in range(MAX_HEADERS + 1):
            r.attributes.request.http.headers[f"x-h{i}"] = "v"
        assert client.reason(r.SerializeToString()) == "bad-request"
        with pytest.raises(grpc.RpcError) as e:
            client.check(b"\x0a" + b"\xff" * (2 << 20))
        assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.check(check_request()).status.code == 0

    def test_labels_from_workloads_file(self, running) -> None:
        """Two Pods of one service account, different labels, different verdicts."""
        _, client, _ = running
        assert client.reason(check_request("ledger.kadath.io", source_ip="127.0.0.2")) == "allowed"
        assert client.reason(check_request("ledger.kadath.io", source_ip="127.0.0.3")) != "allowed"

    def test_identity_mismatch(self, running) -> None:
        """The Pod at the source IP runs as another service account than the certificate."""
        _, client, _ = running
        assert client.reason(check_request(source_ip="127.0.0.4")) == "identity-mismatch"

    def test_unknown_workload(self, running) -> None:
        """cart's certificate from an address no Pod has: denied on both filters, and the
        HTTP body says why (the attack a stolen certificate makes from outside the mesh)."""
        _, client, _ = running
        assert client.reason(check_request(source_ip="10.9.9.9")) == "unknown-workload"
        r = client.check(check_request(None, host="api.kadath.io", source_ip="10.9.9.9"))
        body = json.loads(r.denied_response.body)
        assert (r.status.code, body["reason"]) == (7, "unknown-workload")
        assert "10.9.9.9" in body["message"]
        assert client.reason(check_request(source_ip="10.0.0.1")) == "allowed"

    @pytest.mark.parametrize("source", ["10.0.0.2", "fd00::7", "::ffff:10.0.0.2",
                                        "::ffff:a00:2"])
    def test_every_address_of_a_dual_stack_pod(self, running, source: str) -> None:
        """Both podIPs of a Pod (its IPv6 written long-hand in the manifest), in the spellings
        Envoy may report, find the Pod and its labels."""
        _, client, _ = running
        assert client.reason(check_request("ledger.kadath.io", source_ip=source)) == "allowed"

    def test_records_every_decision(self, running) -> None:
        """Each Check hands one DecisionRecord to the recorder, with the filter kind."""
        _, client, recorder = running
        client.check(check_request(host="api.kadath.io", sni=None))
        wait_for(lambda: bool(recorder.records))  # recorded once the answer is on its way
        rec = recorder.records[-1]
        assert rec.filter == "http" and rec.decision.allowed
        assert rec.identity is not None and rec.identity.principal == CART
        assert rec.duration_ns > 0


class _SlowDecisionRecorder(DecisionRecorder):
    """The recorder `serve` uses, with 0.5 s of work in each record()."""

    def record(self, record: DecisionRecord) -> None:
        time.sleep(0.5)
        super().record(record)


class TestRecordAfterAnswer:
    @MODELS
    def test_a_slow_recorder_does_not_delay_the_answer(self, policies: Path, model) -> None:
        """The record is handed over (submit) and recorded on the recorder's own
        thread: a record() that takes 0.5 s does not hold back the Check it
        records; recording before answering (record_after_answer=False) would."""
        store = PolicyStore()
        DirectorySource(policies).start(store, on_error=pytest.fail)
        for after, slow in ((True, False), (False, True)):
            recorder = _SlowDecisionRecorder(
                TracingSettings(decision_log=False, flush_interval=0.01), metrics=Metrics()
            ).start()
            server = model(store, recorder=recorder, settings=ServerSettings(
                address="127.0.0.1:0", record_after_answer=after))
            client = Client(server.start())
            try:
                client.check(check_request())  # connect, and the first record's 0.5 s
                wait_for(lambda r=recorder: len(r.ring) == 1, timeout=5)
                t0 = time.monotonic()
                assert client.check(check_request()).status.code == 0
                took = time.monotonic() - t0
                assert (took >= 0.5) is slow, (after, took)
                wait_for(lambda r=recorder: len(r.ring) == 2, timeout=5)
            finally:
                client.close()
                server.stop(0)
                recorder.close()

    @MODELS
    def test_submitted_records_reach_the_ring_metrics_and_log(
        self, policies: Path, model
    ) -> None:
        """Every Check answered is recorded by the intake thread: counted once, in
        the ring once, one log line each, in the order answered."""
        import io

        store = PolicyStore()
        DirectorySource(policies).start(store, on_error=pytest.fail)
        out, metrics = io.StringIO(), Metrics()
        recorder = DecisionRecorder(
            TracingSettings(flush_interval=0.01), log_stream=out, metrics=metrics
        ).start()
        server = model(store, recorder=recorder,
                       settings=ServerSettings(address="127.0.0.1:0"))
        client = Client(server.start())
        try:
            for _ in range(50):
                client.check(check_request())
            client.check(check_request(host="evil.example", sni=None))
            wait_for(lambda: len(recorder.ring) == 51, timeout=5)
            assert recorder.flush()
        finally:
            client.close()
            server.stop(0)
            recorder.close()
        allowed = {"verdict": "allow", "reason": "allowed", "namespace": "shop"}
        assert metrics.value("egress_authz_checks_total", allowed) == 50
        assert metrics.value("egress_authz_check_duration_seconds_count") == 51
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [line["reason"] for line in lines] == ["allowed"] * 50 + ["host-not-allowed"]
        assert [r.decision.decision_id for r in recorder.ring.snapshot()] == [
            line["decision_id"] for line in lines]


class TestUnknownWorkloadsOptOut:
    def test_allow_trusts_the_principal_alone(self, policies: Path, tmp_path: Path) -> None:
        """--unknown-workloads allow (SNAT, multi-cluster): an unknown address is identified by
        its certificate; service-account rules apply, label rules do not, and a known Pod
        of another account is still identity-mismatch."""
        from authz.identity import UnknownWorkloads

        (tmp_path / "pods.yaml").write_text(PODS)
        store, index = PolicyStore(), WorkloadIndex()
        WorkloadFileSource(tmp_path / "pods.yaml", index).start(on_error=pytest.fail)
        DirectorySource(policies).start(store, on_error=pytest.fail)
        server = AuthzServer(store, index, settings=ServerSettings(address="127.0.0.1:0"),
                             unknown_workloads=UnknownWorkloads.ALLOW)
        client = Client(server.start())
        try:
            assert client.reason(check_request(source_ip="10.9.9.9")) == "allowed"
            label_rule = check_request("ledger.kadath.io", source_ip="10.9.9.9")
            assert client.reason(label_rule) == "host-not-allowed"
            assert client.reason(check_request(source_ip="127.0.0.4")) == "identity-mismatch"
        finally:
            client.close()
            server.stop(0)


class TestHealth:
    @MODELS
    def test_not_serving_until_a_policy_is_loaded(self, tmp_path: Path, model) -> None:
        """NOT_SERVING and no-policy denials before the first publish; SERVING after."""
        store = PolicyStore()
        server = model(store, settings=ServerSettings(address="127.0.0.1:0"))
        client = Client(server.start())
        try:
            for name in ("", SERVICE_NAME):
                assert client.serving(name) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert client.reason(check_request()) == "no-policy"
            (tmp_path / "p.yaml").write_text(policy_yaml(["api.kadath.io"]))
            DirectorySource(tmp_path).start(store, on_error=print)
            assert client.serving() == health_pb2.HealthCheckResponse.SERVING
            assert client.reason(check_request()) == "allowed"
        finally:
            client.close()
            server.stop(0)

    @MODELS
    def test_in_flight_checks_drain_on_stop(self, policies: Path, model) -> None:
        """stop(grace) lets a Check already being answered finish with its answer."""
        store = PolicyStore()
        DirectorySource(policies).start(store, on_error=print)
        # Recording before the answer, so that the slow recorder keeps the Check in flight.
        settings = ServerSettings(address="127.0.0.1:0", record_after_answer=False)
        server = model(store, recorder=Recording(delay=0.5), settings=settings)
        client = Client(server.start())
        result: list[CheckResponse] = []
        t = threading.Thread(target=lambda: result.append(client.check(check_request())))
        t.start()
        time.sleep(0.2)  # the Check is now inside the recorder
        server.stop(grace=5)
        t.join(5)
        assert result and result[0].status.code == 0
        client.close()


class TestReload:
    def test_change_in_force_within_a_second(self, running, policies: Path) -> None:
        """Removing a host from the file denies it within a second."""
        _, client, _ = running
        assert client.reason(check_request()) == "allowed"
        (policies / "shop.yaml").write_text(policy_yaml(["other.kadath.io"]))
        took = wait_for(lambda: client.reason(check_request()) == "host-not-allowed", 1.0)
        assert took < 1.0

    def test_broken_file_keeps_last_good(self, running, policies: Path) -> None:
        """A file that stops validating keeps its last good policy in force."""
        _, client, _ = running
        (policies / "shop.yaml").write_text(policy_yaml(["*.*.io"]))  # invalid wildcard
        (policies / "zz-marker.yaml").write_text(
            policy_yaml(["marker.kadath.io"], name="marker")
        )
        wait_for(lambda: client.reason(check_request("marker.kadath.io")) == "allowed")
        assert client.reason(check_request("api.kadath.io")) == "allowed"

    def test_bad_yaml_keeps_last_good(self, running, policies: Path) -> None:
        """Unparseable YAML (e.g. caught half-written) keeps the file's policies."""
        _, client, _ = running
        (policies / "shop.yaml").write_text("apiVersion: v1\nkind: [unclosed\n")
        (policies / "zz-marker.yaml").write_text(
            policy_yaml(["marker.kadath.io"], name="marker")
        )
        wait_for(lambda: client.reason(check_request("marker.kadath.io")) == "allowed")
        assert client.reason(check_request("api.kadath.io")) == "allowed"


# --------------------------------------------------------------------------
# The command, as a process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(policies: Path, port: int, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "authz", "serve", "--policies", str(policies),
         "--grpc-address", f"127.0.0.1:{port}", "--admin-address", "", *extra],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("egress-authz: serving Check on"):
            # Keep draining stderr so the process never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line
    proc.kill()
    pytest.fail("serve did not become ready:\n" + "".join(seen))


class TestServeProcess:
    def test_sigterm_drains_and_exits_zero(self, policies: Path) -> None:
        """SIGTERM: Checks sent before it are answered, then a clean exit 0."""
        port = free_port()
        proc, line = start_serve(policies, port)
        assert line.strip() == f"egress-authz: serving Check on 127.0.0.1:{port} (policy revision 1)"
        client = Client(port)
        answers: list[int] = []
        errors: list[grpc.StatusCode] = []

        def hammer() -> None:
            for _ in range(200):
                try:
                    answers.append(client.check(check_request()).status.code)
                except grpc.RpcError as e:
                    errors.append(e.code())
                    return

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        for t in threads:
            t.join(10)
        client.close()
        assert answers and set(answers) == {0}
        # Calls arriving after the stop began are refused by gRPC itself
        # (UNAVAILABLE, or CANCELLED when the stream was already open); Envoy
        # denies both, since failure_mode_allow is false.
        assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}

    @pytest.mark.parametrize("model", ["aio", "threads"])
    def test_shutdown_delay_answers_while_not_serving(self, policies: Path, model: str) -> None:
        """--shutdown-delay: after SIGTERM, health says NOT_SERVING but Checks are answered
        (both serving models)."""
        port = free_port()
        proc, _ = start_serve(policies, port, "--shutdown-delay", "1.5", "--server-model", model)
        client = Client(port)
        try:
            assert client.serving() == health_pb2.HealthCheckResponse.SERVING
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: client.serving() == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert client.check(check_request()).status.code == 0
            assert proc.wait(timeout=15) == 0
        finally:
            client.close()
            proc.kill()

    @pytest.mark.parametrize("model", ["threads", "aio"])
    def test_workers_share_the_port(self, policies: Path, model: str) -> None:
        """--workers 2: two processes answer on one port (decision ids name the process),
        on either serving model (the workers get --server-model too)."""
        port = free_port()
        proc, line = start_serve(policies, port, "--workers", "2", "--server-model", model)
        try:
            assert "2 workers" in line
            prefixes = set()
            for _ in range(40):  # a new connection each time: the kernel spreads them
                client = Client(port)
                r = client.check(check_request())
                assert r.status.code == 0
                prefixes.add(r.dynamic_metadata.fields["decision_id"].string_value[:10])
                client.close()
                if len(prefixes) == 2:
                    break
            assert len(prefixes) == 2
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0

    def test_dead_worker_is_restarted(self, policies: Path) -> None:
        """The supervisor replaces a worker that dies; the port keeps answering."""
        port = free_port()
        proc, _ = start_serve(policies, port, "--workers", "2")
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            before = set(children.read_text().split())
            assert len(before) == 2
            victim = int(sorted(before)[0])
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(set(children.read_text().split()) - before) == 1, 10)
            for _ in range(10):
                client = Client(port)
                assert client.check(check_request()).status.code == 0
                client.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0

    def test_busy_port_fails_loudly(self, policies: Path) -> None:
        """Without --workers, a second server on a used port exits instead of sharing it."""
        port = free_port()
        proc, _ = start_serve(policies, port)
        try:
            second = subprocess.run(
                [sys.executable, "-m", "authz", "serve", "--policies", str(policies),
                 "--grpc-address", f"127.0.0.1:{port}", "--admin-address", ""],
                capture_output=True, text=True, timeout=30, cwd=ROOT,
                env={**os.environ},
            )
            assert second.returncode == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
