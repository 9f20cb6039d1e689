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
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
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

    def test_decisions_name_the_port_the_app_dialled(self, demo: Run) -> None:
        """The loopback gateway listens on unprivileged ports, as istioctl's gateway does
        (8443 behind 443); serve's --gateway-port-map turns them back, so decisions, traces
        and the suggested rules say 443 / 80, never the listener port (which a user would
        otherwise copy into a real policy)."""
        view = demo.section("$ egress-authz traces", "$ egress-authz explain")
        ports = {m.group(1) for m in re.finditer(r"\.(?:io|com):(\d+) ", view)}
        assert ports == {"443", "80"}, view
        assert re.search(r"ports: \[(443|80)\]", demo.section("$ egress-authz explain",
                                                               "demo finished"))

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
    def running(self, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Console]]:
        proc = subprocess.Popen(
            [*DEMO, "--keep-running"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        try:
            console = Console(proc)
            console.wait_for(lambda line: line.startswith("Logs: "), RUN_TIMEOUT)
            yield proc, console
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def test_commands_work_edits_reload_and_sigterm_cleans_up(
        self, running: tuple[subprocess.Popen[str], Console]
    ) -> None:
        """The printed commands do what their comments say in a fresh shell (no venv on
        PATH, another directory), each policy edit is reported on the console (accepted,
        or rejected with its error), and SIGTERM stops everything and removes the files."""
        proc, console = running
        lines = list(console.lines)
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
        if shutil.which("openssl"):
            done = _sh(commands[3])  # ends cleanly: the stand-in sends close_notify
            assert done.returncode == 0 and '"host": "api.leng.com"' in done.stdout, done

        # The CLI commands, as printed: export, traces, explain of a real id.
        export = next(line for line in lines if line.startswith("export EGRESS_AUTHZ_SERVER="))
        after = lines[lines.index(export) + 1 :]
        cli = [line for line in after if " traces" in line or " explain " in line]
        assert len(cli) == 3 and "DECISION_ID" not in cli[2], cli
        traced = _sh(f"{export}; {cli[0]}")
        assert traced.returncode == 0 and "api.kadath.io" in traced.stdout, traced
        explained = _sh(f"{export}; {cli[2]}")
        assert explained.returncode == 0 and "DENY (host-not-allowed)" in explained.stdout
        follow = _sh(f"{export}; timeout 2 {cli[1]}")
        assert follow.returncode == 124 and follow.stdout.startswith("TIME"), follow
        # The decision viewer, at the URL printed for it, and an explanation it reads.
        hint = next(i for i, line in enumerate(lines) if "`egress-authz ui` prints this URL" in line)
        page = lines[hint + 1]
        with urllib.request.urlopen(page, timeout=10) as resp:
            assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
            assert b'src="/ui/app.js"' in resp.read()
        explained_id = cli[2].rsplit(" ", 1)[1]
        with urllib.request.urlopen(f"{page}v1/explanations/{explained_id}", timeout=10) as resp:
            assert "DENY (host-not-allowed)" in json.load(resp)["text"]

        # A broken edit is reported on the console with its error, and changes nothing...
        shop = next(
            Path(p.strip()) for p in lines if p.startswith("  /") and p.endswith("shop-policy.yaml")
        )
        text = shop.read_text()
        assert "hosts: [api.leng.com]" in text
        shop.write_text(text.replace("hosts: [api.leng.com]", "hosts: [api.leng.com"))
        console.wait_for(lambda line: line.startswith("reload: REJECTED"), 10)
        console.wait_for(lambda line: "bad YAML" in line, 5)
        # ...and the edit the instructions suggest is accepted, and applies live.
        shop.write_text(text.replace("hosts: [api.leng.com]", "hosts: [api.leng.com, api.kadath.io]"))
        console.wait_for(lambda line: line.startswith("reload: accepted, policy revision"), 10)
        if shutil.which("curl"):
            assert _sh(commands[1]).returncode == 0

        workdir = Path(re.search(r"Pod manifests to (\S+)", out).group(1))  # type: ignore[union-attr]
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", out)]
        assert workdir.is_dir() and ports
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # the verdicts were as expected
        assert not workdir.exists()
        assert _processes_mentioning(str(workdir)) == []
        for port in ports:
            assert not _listening(port), f"something still listens on {port}"


class Console:
    """The demo's output, read line by line in a thread so that a test can wait
    for a line (an event) without blocking on a pipe."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, match: Callable[[str], bool], timeout: float) -> str:
        seen = 0
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if match(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                assert left > 0, "not printed in time:\n" + "\n".join(self.lines[-40:])
                self._changed.wait(left)


class TestStopWhileStarting:
    def test_stop_waits_for_a_start_under_way_and_refuses_later_ones(
        self, tmp_path: Path
    ) -> None:
        """stop() while a process is being started waits for that start (so the
        process is stopped, not orphaned), and a start the pool runs after stop()
        began never starts anything (Ctrl-C during the pool's hand-out)."""
        stack = DemoStack(Ports.choose(None), tmp_path / "work")
        inside, release = threading.Event(), threading.Event()
        started: list[str] = []

        def slow_start() -> None:
            inside.set()
            release.wait(10)
            started.append("slow")

        runner = threading.Thread(target=stack._guarded(slow_start))
        runner.start()
        assert inside.wait(10)
        stopped = threading.Event()
        stopper = threading.Thread(target=lambda: (stack.stop(), stopped.set()))
        stopper.start()
        assert not stopped.wait(0.3), "stop() returned while a start was under way"
        release.set()
        assert stopped.wait(10)
        runner.join(10)
        stopper.join(10)
        assert started == ["slow"]
        with pytest.raises(DemoError):
            stack._guarded(lambda: started.append("late"))()
        assert started == ["slow"]


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
    def test_copies_load_with_the_mesh_ports_unchanged(self, tmp_path: Path) -> None:
        """istio/examples + the demo's audit policy load cleanly, with the ports a mesh policy
        names (443, 80): the loopback listener ports are serve's business (port map)."""
        written = policies.write_policies(tmp_path)
        assert {p.name for p in written} == {
            "cluster-policy.yaml", "shop-policy.yaml", "marketing-policy.yaml"
        }
        loaded = load_path(tmp_path)
        assert loaded.problems == []
        by_ns = {p.source.namespace: p for p in loaded.policies}
        assert {r.name: set(r.ports) for r in by_ns["shop"].rules} == {
            "api-connector-to-kadath": {443},
            "finance-to-leng": {443},
        }
        assert [set(r.ports) for r in by_ns["marketing"].rules] == [{80}]
        assert by_ns["marketing"].mode is Mode.AUDIT
        assert "api.stealyourmoney.com" in by_ns["egress-authz"].deny

    def test_package_copies_equal_istio_examples(self) -> None:
        """The package data the demo reads (so that a wheel runs it) is istio/examples/, byte
        for byte: the policies a user reads in the repository are the ones the demo runs."""
        shipped = {f.name: f.read_bytes() for f in policies.source_files()}
        for example in (ROOT / "istio" / "examples").glob("*.yaml"):
            assert shipped.get(example.name) == example.read_bytes(), example.name

    def test_copies_say_where_they_came_from(self, tmp_path: Path) -> None:
        """A user editing a copy reads where it came from."""
        policies.write_policies(tmp_path)
        text = (tmp_path / "shop-policy.yaml").read_text()
        assert "Copied from authz/demo/policies/shop-policy.yaml" in text

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
    def test_envoy_that_cannot_start_exits_1(self, tmp_path: Path) -> None:
        """A broken Envoy binary: said once, with its output, exit 1 (a failure, not a
        usage error), nothing started."""
        fake = tmp_path / "envoy"
        fake.write_text("#!/bin/sh\necho 'envoy: cannot start' >&2\nexit 1\n")
        fake.chmod(0o755)
        began = time.monotonic()
        done = subprocess.run(
            DEMO, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT, check=False,
            env={**os.environ, "ENVOY_BIN": str(fake)},
        )
        out = done.stdout + done.stderr
        assert done.returncode == 1, out
        assert "Envoy cannot start" in out and "envoy: cannot start" in out
        assert "Traceback" not in out
        assert "[1/5]" not in out  # found out before anything was started
        assert time.monotonic() - began < 10


def _sh(command: str) -> subprocess.CompletedProcess[str]:
    """`command` in a fresh shell: a minimal environment (no venv on PATH), outside
    the checkout, as a user pasting it into a new terminal."""
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", command], capture_output=True, text=True,
        timeout=15, check=False, cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )  # fmt: skip


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
