"""`egress-authz demo`, run as `make demo` runs it, judged by what it prints.

One demo run (a subprocess, like a user's) is shared by the output checks;
--keep-running and the start-up failures get runs of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz.demo import policies, table
from authz.demo.calls import Outcome
from authz.demo.scenario import CALLS, EXPLAIN_CALL, PODS
from authz.demo.stack import DemoError, DemoStack, Ports
from authz.demo.table import COLUMNS
from authz.loader import load_path
from authz.model import Mode

ROOT = Path(__file__).resolve().parents[1]
DEMO = [sys.executable, "-m", "authz", "demo"]
RUN_TIMEOUT = 60


@dataclass
class Run:
    code: int
    out: str
    seconds: float

    def section(self, start: str, end: str | None = None) -> str:
        """The text from the line starting with `start` to the one starting with `end`."""
        lines = self.out.splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith(start))
        last = len(lines)
        if end is not None:
            last = next(i for i in range(first + 1, len(lines)) if lines[i].startswith(end))
        return "\n".join(lines[first:last])


# A proxy that does not exist: the demo must never send loopback traffic to
# one (company laptops set these), so every run here has them set.
PROXY_ENV = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY")}


def run_demo(*args: str, timeout: float = RUN_TIMEOUT) -> Run:
    began = time.monotonic()
    done = subprocess.run(
        [*DEMO, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False,
        env={**os.environ, **PROXY_ENV},
    )
    return Run(done.returncode, done.stdout + done.stderr, time.monotonic() - began)


def table_rows(out: str) -> list[dict[str, str]]:
    """The verdict table, cut at the header's column starts."""
    lines = out.splitlines()
    header_at = next(i for i, line in enumerate(lines) if re.match(r"#\s+CASE\s", line))
    header = lines[header_at]
    starts = [header.index(name) for name in COLUMNS]
    rows = []
    for line in lines[header_at + 1 :]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


@pytest.fixture(scope="module")
def demo() -> Run:
    return run_demo()


@pytest.mark.envoy
@pytest.mark.timeout(RUN_TIMEOUT + 30)
class TestDemoRun:
    def test_exits_zero_quickly(self, demo: Run) -> None:
        """Every verdict as expected => exit 0, well inside the 30 s budget."""
        assert demo.code == 0, demo.out
        assert demo.seconds < 30, demo.out

    def test_progress_lines(self, demo: Run) -> None:
        """Start-up is narrated step by step, naming what became ready."""
        for step in range(1, 6):
            assert f"[{step}/5] " in demo.out
        assert "ready: egress-authz serve" in demo.out
        assert "ready: gateway Envoy" in demo.out
        for pod in PODS:
            assert f"ready: sidecar of {pod.workload}" in demo.out

    def test_table_has_each_expected_verdict(self, demo: Run) -> None:
        """One row per scripted call, with its verdict, reason and `ok`."""
        rows = table_rows(demo.out)
        assert len(rows) == len(CALLS)
        for row, call in zip(rows, CALLS, strict=True):
            assert row["WHO"] == call.pod.workload
            assert row["WHERE"] == call.host
            assert row["VIA"] == call.via.value
            assert (row["VERDICT"], row["REASON"], row["CHECK"]) == (
                call.expect_verdict,
                call.expect_reason,
                "ok",
            ), row

    def test_client_saw_what_the_verdict_means(self, demo: Run) -> None:
        """Allowed: the host answered; denied: a 403 with the reason (HTTP) or a closed connection (TLS)."""
        for row, call in zip(table_rows(demo.out), CALLS, strict=True):
            if call.expect_through:
                assert row["CLIENT SAW"] == f"200 from {call.host}", row
            elif call.via.protocol == "HTTP":
                assert row["CLIENT SAW"] == f"403 {call.expect_reason}", row
            else:
                assert row["CLIENT SAW"] == "connection closed", row

    def test_the_scenario_covers_the_issue(self) -> None:
        """HTTP and TLS; allowed, by host, by label, by identity, SNI/Host mismatch, audit."""
        got = {(c.via.protocol, c.expect_verdict, c.expect_reason) for c in CALLS}
        assert ("TLS", "allow", "allowed") in got
        assert ("HTTP", "allow", "allowed") in got
        assert ("TLS", "deny", "host-not-allowed") in got
        assert ("HTTP", "deny", "host-not-allowed") in got
        assert ("HTTP", "deny", "identity-mismatch") in got
        assert ("HTTP", "deny", "sni-host-mismatch") in got
        assert ("HTTP", "audit", "host-not-allowed") in got
        assert ("TLS", "deny", "cluster-denied") in got

    def test_traces_view_shows_the_same_decisions(self, demo: Run) -> None:
        """`egress-authz traces` lists the calls' decisions, in call order."""
        view = demo.section("$ egress-authz traces", "$ egress-authz explain").strip()
        lines = view.splitlines()
        assert lines[1].split()[:5] == ["TIME", "WORKLOAD", "DESTINATION", "VERDICT", "REASON"]
        records = [line.split() for line in lines[2:] if line.strip()]
        assert len(records) == len(CALLS)
        for rec, call in zip(records, CALLS, strict=True):
            # The decision names the certificate's workload (the stolen one for row 6).
            owner = (call.certificate_of or call.pod).workload
            assert rec[1] == owner, rec
            assert (rec[3], rec[4]) == (call.expect_verdict, call.expect_reason), rec

    def test_explain_of_the_label_denial(self, demo: Run) -> None:
        """`egress-authz explain` shows the identity, the rule that almost matched and why not."""
        call = CALLS[EXPLAIN_CALL]
        text = demo.section("$ egress-authz explain", "demo finished")
        assert f"DENY ({call.expect_reason})" in text
        assert f"spiffe://cluster.local/ns/{call.pod.namespace}/sa/{call.pod.service_account}" in text
        assert f"{call.pod.name} ({call.pod.ip})" in text
        assert "workload labels app=cart, function=finance do not match matchLabels function=api-connector" in text
        assert "kubectl -n shop edit configmap egress-policy" in text


@pytest.mark.envoy
@pytest.mark.timeout(RUN_TIMEOUT + 30)
class TestKeepRunning:
    @pytest.fixture
    def running(self, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
        proc = subprocess.Popen(
            [*DEMO, "--keep-running"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + RUN_TIMEOUT
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("Logs: ") or time.monotonic() > deadline:
                    break
            assert any(line.startswith("Logs: ") for line in lines), "\n".join(lines)
            yield proc, lines
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def test_commands_work_edits_reload_and_sigterm_cleans_up(
        self, running: tuple[subprocess.Popen[str], list[str]]
    ) -> None:
        """The printed commands do what their comments say, a policy edit applies live,
        and SIGTERM stops every process and removes the temporary files."""
        proc, lines = running
        out = "\n".join(lines)
        commands = [line for line in lines if line.startswith(("curl ", "printf "))]
        assert len(commands) == 5, out
        if shutil.which("curl"):
            allowed = _sh(commands[0])
            assert json.loads(allowed.stdout)["host"] == "api.leng.com", allowed
            assert _sh(commands[1]).returncode != 0  # denied: connection closed
            denied = json.loads(_sh(commands[2]).stdout)
            assert denied["reason"] == "host-not-allowed"
            assert json.loads(_sh(commands[4]).stdout)["host"] == "api.kadath.io"

            # The live edit the instructions suggest.
            shop = next(Path(p.strip()) for p in lines if p.strip().endswith("shop-policy.yaml"))
            text = shop.read_text()
            assert "hosts: [api.leng.com]" in text
            shop.write_text(text.replace("hosts: [api.leng.com]", "hosts: [api.leng.com, api.kadath.io]"))
            deadline = time.monotonic() + 10
            while _sh(commands[1]).returncode != 0:
                assert time.monotonic() < deadline, "the edited policy was not reloaded"
                time.sleep(0.2)

        workdir = Path(re.search(r"Pod manifests to (\S+)", out).group(1))  # type: ignore[union-attr]
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", out)]
        assert workdir.is_dir() and ports
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # the verdicts were as expected
        assert not workdir.exists()
        assert _processes_mentioning(str(workdir)) == []
        for port in ports:
            assert not _listening(port), f"something still listens on {port}"


@pytest.mark.envoy
@pytest.mark.timeout(RUN_TIMEOUT)
class TestInterruptedStart:
    def test_sigint_while_starting_stops_everything(self) -> None:
        """Ctrl-C while the Envoys and the service start: all of them stop, files go, exit 130."""
        proc = subprocess.Popen(
            [*DEMO], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, **PROXY_ENV},
        )
        try:
            assert proc.stdout is not None
            workdir = None
            for line in proc.stdout:
                if m := re.search(r"Pod manifests to (\S+)", line):
                    workdir = m.group(1)
                if line.startswith("[3/5]"):
                    break
            assert workdir is not None
            proc.send_signal(signal.SIGINT)
            rest = proc.stdout.read()
            assert proc.wait(timeout=30) == 130, rest
            assert "interrupted: stopping everything the demo started" in rest
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert not Path(workdir).exists()
        assert _processes_mentioning(workdir) == []


class TestPolicyCopies:
    ALIASES = {443: 40443, 80: 40080}

    def test_copies_load_with_the_loopback_ports_beside_the_mesh_ports(
        self, tmp_path: Path
    ) -> None:
        """istio/examples + the demo's audit policy load cleanly; 443/80 gain their stand-ins."""
        written = policies.write_policies(tmp_path, self.ALIASES)
        assert {p.name for p in written} == {
            "cluster-policy.yaml", "shop-policy.yaml", "marketing-policy.yaml"
        }
        loaded = load_path(tmp_path)
        assert loaded.problems == []
        by_ns = {p.source.namespace: p for p in loaded.policies}
        assert {r.name: set(r.ports) for r in by_ns["shop"].rules} == {
            "api-connector-to-kadath": {443, 40443},
            "finance-to-leng": {443, 40443},
        }
        assert [set(r.ports) for r in by_ns["marketing"].rules] == [{80, 40080}]
        assert by_ns["marketing"].mode is Mode.AUDIT
        assert "api.stealyourmoney.com" in by_ns["egress-authz"].deny

    def test_package_copies_equal_istio_examples(self) -> None:
        """The package data the demo reads (so that a wheel runs it) is istio/examples/, byte
        for byte: the policies a user reads in the repository are the ones the demo runs."""
        shipped = {f.name: f.read_bytes() for f in policies.source_files()}
        for example in (ROOT / "istio" / "examples").glob("*.yaml"):
            assert shipped.get(example.name) == example.read_bytes(), example.name

    def test_copies_say_where_they_came_from(self, tmp_path: Path) -> None:
        """A user editing a copy reads its origin and why the ports differ."""
        policies.write_policies(tmp_path, self.ALIASES)
        text = (tmp_path / "shop-policy.yaml").read_text()
        assert "Copied from authz/demo/policies/shop-policy.yaml" in text
        assert "443 -> 40443" in text

    def test_a_policy_that_does_not_load_stops_the_demo(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A broken policy file is reported before anything starts, not as wrong verdicts."""
        extra = tmp_path / "extra"
        extra.mkdir()
        (extra / "bad.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bad, namespace: shop, labels: "
            "{egress-authz.io/policy: 'true'}}\ndata:\n  policy.yaml: |\n    rules: [{name: x}]\n"
        )
        shipped = policies.source_files()
        monkeypatch.setattr(policies, "source_files", lambda: [*shipped, extra / "bad.yaml"])
        stack = DemoStack(Ports.choose(None), tmp_path / "work")
        with pytest.raises(DemoError, match="policies do not load"):
            stack.write_files()


class TestTable:
    """The CHECK column turns red flags into words (no Envoy needed)."""

    def outcome(
        self, n: int, verdict: str, reason: str, *, through: bool, connections: int = 0
    ) -> Outcome:
        decision = {"verdict": verdict, "reason": reason, "decision_id": f"id{n}"}
        return Outcome(CALLS[n], "x", through, decision, connections)

    def test_expected_rows_say_ok(self) -> None:
        """A row whose verdict, reason and reach are as scripted says ok."""
        o = self.outcome(2, "deny", "host-not-allowed", through=False)
        assert table_rows(table.render([o]))[0]["CHECK"] == "ok"

    def test_a_wrong_verdict_names_the_expected_one(self) -> None:
        """A different verdict or reason: the row says what was expected."""
        out = table.render([self.outcome(2, "allow", "allowed", through=True)])
        assert table_rows(out)[0]["CHECK"] == "EXPECTED deny host-not-allowed"

    def test_a_denied_call_that_reached_its_host_is_flagged(self) -> None:
        """Deny recorded but a stand-in accepted a connection during the call: flagged."""
        o = self.outcome(2, "deny", "host-not-allowed", through=False, connections=1)
        assert not o.as_expected
        assert table_rows(table.render([o]))[0]["CHECK"] == "REACHED THE HOST"

    def test_a_missing_decision_is_not_ok(self) -> None:
        """No record in the admin API: the row cannot pass."""
        o = Outcome(CALLS[0], "200 from api.kadath.io", True, None)
        assert not o.as_expected
        assert table_rows(table.render([o]))[0]["REASON"] == "(no decision recorded)"


class TestStartFailures:
    def test_a_taken_port_is_named_and_exits_2(self) -> None:
        """--port-base on a port in use: a clear message, exit 2, nothing started."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            run = run_demo("--port-base", str(port), timeout=30)
        assert run.code == 2, run.out
        assert f"port 127.0.0.1:{port} is taken" in run.out
        assert "[1/5]" not in run.out

    @pytest.mark.envoy
    def test_envoy_that_cannot_start_exits_2(self, tmp_path: Path) -> None:
        """A broken Envoy binary: said once, with its output, exit 2, nothing started."""
        fake = tmp_path / "envoy"
        fake.write_text("#!/bin/sh\necho 'envoy: cannot start' >&2\nexit 1\n")
        fake.chmod(0o755)
        began = time.monotonic()
        done = subprocess.run(
            DEMO, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT, check=False,
            env={**os.environ, "ENVOY_BIN": str(fake)},
        )
        out = done.stdout + done.stderr
        assert done.returncode == 2, out
        assert "Envoy cannot start" in out and "envoy: cannot start" in out
        assert "Traceback" not in out
        assert "[1/5]" not in out  # found out before anything was started
        assert time.monotonic() - began < 10


def _sh(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=15, check=False
    )


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name `text` (Envoys and serve name the workdir)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked
        joined = b" ".join(args).decode(errors="replace")
        if text in joined:
            found.append(joined)
    return found


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
