"""`traces`/`explain`/`suggest --kube`: every replica, through the API emulator's
pods list and pods/portforward, merged by time and saying which replica answered."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authz.cli import main
from authz.model import Verdict
from authz.observe.admin import AdminServer
from authz.observe.metrics import Metrics
from authz.observe.recorder import DecisionRecorder, TracingSettings
from authz.records import DecisionRecord
from tests.kube_emulator import KubeEmulator
from tests.test_tracing import make_record

BASE_NS = 1_790_000_000 * 10**9


def _pod(name: str, *, ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "egress-authz",
                     "creationTimestamp": "2026-11-01T00:00:00Z",
                     "labels": {"app.kubernetes.io/name": "egress-authz"}},
        "spec": {"containers": [{"name": "authz", "image": "x"}]},
        "status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip


class Replica:
    def __init__(self) -> None:
        self.recorder = DecisionRecorder(
            TracingSettings(flush_interval=0.01), log_stream=io.StringIO(), metrics=Metrics()
        )
        self.admin = AdminServer("127.0.0.1:0", self.recorder, metrics=Metrics()).start()

    def record(self, rec: DecisionRecord) -> DecisionRecord:
        self.recorder.record(rec)
        return rec

    def close(self) -> None:
        self.admin.stop()
        self.recorder.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[KubeEmulator, Path, Replica, Replica]]:
    """Two ready replicas (a, b) and a starting one, each a real admin endpoint."""
    a, b = Replica(), Replica()
    with KubeEmulator() as emu:
        emu.seed(_pod("authz-a"), _pod("authz-b"), _pod("authz-c-starting", ready=False))
        emu.port_forwards[("egress-authz", "authz-a", 9090)] = ("127.0.0.1", a.admin.port)
        emu.port_forwards[("egress-authz", "authz-b", 9090)] = ("127.0.0.1", b.admin.port)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emu",
            "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}],
        }))  # fmt: skip
        try:
            yield emu, kubeconfig, a, b
        finally:
            a.close()
            b.close()


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def interleaved(a: Replica, b: Replica) -> list[tuple[str, DecisionRecord]]:
    """Six denials alternating between the replicas, one second apart."""
    out = []
    for i in range(6):
        owner, name = (a, "authz-a") if i % 2 == 0 else (b, "authz-b")
        rec = owner.record(make_record(start_unix_ns=BASE_NS + i * 10**9, host=f"h{i}.example"))
        out.append((name, rec))
    a.recorder.flush()
    b.recorder.flush()
    return out


class TestTracesKube:
    def test_merges_every_replica_by_time(
        self, cluster: tuple[KubeEmulator, Path, Replica, Replica],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """Both ready replicas are asked through pods/portforward (the starting one is
        not); their decisions come back as one list by time, each naming its replica."""
        emu, kubeconfig, a, b = cluster
        sent = interleaved(a, b)
        code, out, err = cli(capsys, "traces", "--kube", "--kubeconfig", str(kubeconfig),
                             "-o", "json")  # fmt: skip
        assert code == 0, err
        got = json.loads(out)
        assert [d["decision_id"] for d in got] == [r.decision.decision_id for _, r in sent]
        assert [d["replica"] for d in got] == [name for name, _ in sent]
        both = {
            "/api/v1/namespaces/egress-authz/pods/authz-a/portforward",
            "/api/v1/namespaces/egress-authz/pods/authz-b/portforward",
        }

        def forwarded() -> set[str]:  # logged by the emulator when a stream ends
            return {r.path for r in emu.requests if r.path.endswith("/portforward")}

        emu.wait_for(lambda: forwarded() == both, timeout=10)
        assert forwarded() == both

    def test_limit_applies_to_the_merge_and_table_says_replica(
        self, cluster: tuple[KubeEmulator, Path, Replica, Replica],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """--limit 3 gives the 3 newest over all replicas; the table has a REPLICA column."""
        _, kubeconfig, a, b = cluster
        sent = interleaved(a, b)
        code, out, err = cli(capsys, "traces", "--kube", "--kubeconfig", str(kubeconfig),
                             "--limit", "3")  # fmt: skip
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[-1] == "REPLICA"
        assert [line.split()[-1] for line in lines[1:]] == [n for n, _ in sent[-3:]]
        assert [f"h{i}.example" in lines[i - 2] for i in (3, 4, 5)] == [True] * 3

    def test_one_replica_down_the_other_answers(
        self, cluster: tuple[KubeEmulator, Path, Replica, Replica],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """A replica that cannot be reached is named on stderr; the other's decisions
        are still listed."""
        _, kubeconfig, a, b = cluster
        sent = interleaved(a, b)
        b.admin.stop()
        code, out, err = cli(capsys, "traces", "--kube", "--kubeconfig", str(kubeconfig),
                             "-o", "json")  # fmt: skip
        assert code == 0
        assert "authz-b" in err and "did not answer" in err
        assert {d["replica"] for d in json.loads(out)} == {"authz-a"}
        assert len(json.loads(out)) == sum(1 for n, _ in sent if n == "authz-a")

    def test_follow_merges_the_replicas_streams(
        self, cluster: tuple[KubeEmulator, Path, Replica, Replica],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """--follow reads every replica's stream at once: each replays its decision
        (--since) and closes after one (--limit 1), and both arrive, named."""
        import time

        _, kubeconfig, a, b = cluster
        now = time.time_ns()
        ra = a.record(make_record(start_unix_ns=now, host="from-a.example"))
        rb = b.record(make_record(start_unix_ns=now, host="from-b.example"))
        a.recorder.flush()
        b.recorder.flush()
        code, out, err = cli(capsys, "traces", "--kube", "--kubeconfig", str(kubeconfig),
                             "--follow", "--since", "1h", "--limit", "1", "-o", "json")  # fmt: skip
        assert code == 0, err
        got = {d["decision_id"]: d["replica"] for d in map(json.loads, out.splitlines())}
        assert got == {ra.decision.decision_id: "authz-a", rb.decision.decision_id: "authz-b"}

    def test_no_ready_replica_is_an_error(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No ready pod: exit 1 saying how many were found."""
        with KubeEmulator() as emu:
            emu.seed(_pod("authz-starting", ready=False))
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "emu",
                "clusters": [{"name": "emu", "cluster": {"server": emu.url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "u"}}],
            }))  # fmt: skip
            code, out, err = cli(capsys, "traces", "--kube", "--kubeconfig", str(kubeconfig))
        assert code == 1 and out == ""
        assert "no ready pod in namespace egress-authz" in err and "(of 1 found)" in err


class TestExplainSuggestKube:
    def test_explain_finds_the_replica_that_recorded_it(
        self, cluster: tuple[KubeEmulator, Path, Replica, Replica],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """An id recorded only by replica b is explained, saying so."""
        _, kubeconfig, _, b = cluster
        rec = b.record(make_record(host="only-on-b.example", decision_id="0123456789abcdef01"))
        b.recorder.flush()
        code, out, err = cli(capsys, "explain", rec.decision.decision_id, "--kube",
                             "--kubeconfig", str(kubeconfig))  # fmt: skip
        assert code == 0, err
        assert "recorded by replica authz-b" in out and "only-on-b.example" in out
        code, _, err = cli(capsys, "explain", "ffffffffffffffff", "--kube",
                           "--kubeconfig", str(kubeconfig))  # fmt: skip
        assert code == 1 and "in no replica's buffer" in err

    def test_suggest_uses_every_replica(
        self, cluster: tuple[KubeEmulator, Path, Replica, Replica],
        capsys: pytest.CaptureFixture[str],
    ) -> None:  # fmt: skip
        """Hosts denied on either replica are both in the suggested policy."""
        _, kubeconfig, a, b = cluster
        a.record(make_record(namespace="shop", host="pay.example", verdict=Verdict.DENY))
        b.record(make_record(namespace="shop", host="ship.example", verdict=Verdict.DENY))
        a.recorder.flush()
        b.recorder.flush()
        code, out, err = cli(capsys, "suggest", "-n", "shop", "--kube",
                             "--kubeconfig", str(kubeconfig))  # fmt: skip
        assert code == 0, err
        assert "pay.example" in out and "ship.example" in out
