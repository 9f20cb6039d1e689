"""Large policy files are parsed in a child process (authz/offload.py) with the same result.

The figure this is for (Check latency during a large reload) is a benchmark:
bench/bench_reload.py. Here: the child's result equals an in-process load, a child
that dies or talks garbage is a reported problem that keeps the last good policy,
and the collector pause is balanced.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from pathlib import Path

import pytest

from authz import offload
from authz.loader import load_path
from authz.offload import load_file
from authz.policy import PolicyError
from authz.sources import DirectorySource
from authz.store import PolicyStore, gc_paused
from tests.test_sources import BROKEN_HOSTS, configmap, write

pytestmark = pytest.mark.timeout(60)

LABELLED = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: finance
  namespace: shop
  labels: {egress-authz.io/policy: "true"}
data:
  policy.yaml: |
    rules:
      - name: ledger
        workloads: {matchLabels: {function: finance}, serviceAccounts: [cart]}
        hosts: [ledger.kadath.io, "*.kadath.io"]
        ports: [443, 8443]
"""
UNLABELLED = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: stray, namespace: shop}
data: {policy.yaml: "rules: []"}
"""


def big_file(path: Path) -> Path:
    write(path, "---\n".join([LABELLED, configmap("good"), configmap("bad", BROKEN_HOSTS),
                              UNLABELLED]))
    return path


class TestChildResult:
    def test_same_as_in_process(self, tmp_path: Path) -> None:
        """Policies (label selectors included), per-ConfigMap errors, problems and warnings
        from the child equal those of load_path."""
        path = big_file(tmp_path / "p.yaml")
        here = load_path(path, cluster_namespace="egress-authz")
        child = load_file(path, cluster_namespace="egress-authz", min_bytes=0)
        assert child.policies == here.policies and len(child.policies) == 2
        assert child.problems == here.problems and child.problems
        assert child.warnings == here.warnings and child.warnings
        assert child.files == here.files
        assert list(child.by_ref) == list(here.by_ref)
        bad = [o for o in child.by_ref.values() if isinstance(o, PolicyError)]
        assert len(bad) == 1
        assert bad[0].problems == next(
            o for o in here.by_ref.values() if isinstance(o, PolicyError)).problems
        selector = child.policies[0].rules[0].workloads
        assert dict(selector.match_labels) == {"function": "finance"}

    def test_small_files_stay_in_process(self, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """Below the threshold no child is started (its start-up would cost more)."""
        monkeypatch.setattr(offload, "CHILD_ARGV", [sys.executable, "-c", "raise SystemExit(9)"])
        result = load_file(big_file(tmp_path / "p.yaml"), cluster_namespace="egress-authz")
        assert len(result.policies) == 2
        assert not [p for p in result.problems if "cannot load" in p]

    @pytest.mark.parametrize(
        ("script", "said"),
        [
            ("import sys; sys.stderr.write('MemoryError\\n'); sys.exit(3)",
             "exit code 3): MemoryError"),
            ("import sys; sys.stdout.write('not a pickle' * 100)", "sent no result"),
            ("import time; time.sleep(60)", "took over 0.5 s"),
        ],
        ids=["dies", "garbage", "hangs"],
    )
    def test_failing_child_is_a_problem(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        script: str, said: str) -> None:
        """A child that dies, writes garbage or hangs gives one problem and no policy."""
        monkeypatch.setattr(offload, "CHILD_ARGV", [sys.executable, "-c", script])
        monkeypatch.setattr(offload, "CHILD_TIMEOUT", 0.5)
        result = load_file(big_file(tmp_path / "p.yaml"), cluster_namespace="x", min_bytes=0)
        assert not result.policies and not result.by_ref
        assert len(result.problems) == 1 and "cannot load" in result.problems[0]
        assert said in result.problems[0], result.problems[0]


class TestDirectorySourceOffloaded:
    def test_reload_through_the_child_and_last_good_on_failure(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """With every file offloaded, a change comes into force; when the child then fails,
        the file's last good policies stay and the failure is reported."""
        monkeypatch.setattr(offload, "OFFLOAD_MIN_BYTES", 0)
        path = tmp_path / "p.yaml"
        write(path, configmap("a"))
        store, errors = PolicyStore(), []
        source = DirectorySource(tmp_path)
        source.start(store, errors.append)
        try:
            assert store.current is not None
            write(path, configmap("a", "[api.leng.com]"))
            source.reload()
            assert store.current.policy_set.policies[0].rules[0].hosts == ("api.leng.com",)
            monkeypatch.setattr(offload, "CHILD_ARGV", [sys.executable, "-c", "exit(1)"])
            write(path, configmap("a", "[api.other.com]"))
            revision = store.current.revision
            source.reload()
            assert store.current.revision == revision
            assert store.current.policy_set.policies[0].rules[0].hosts == ("api.leng.com",)
            assert "cannot load" in errors[-1]
        finally:
            source.stop()


class TestGcPaused:
    def test_nested_and_threaded_pauses_restore_the_collector(self) -> None:
        """The collector is off inside any open pause and on again after the last one."""
        assert gc.isenabled()
        inside, release = threading.Event(), threading.Event()

        def other() -> None:
            with gc_paused():
                inside.set()
                release.wait(5)

        t = threading.Thread(target=other)
        t.start()
        assert inside.wait(5)
        with gc_paused():
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert not gc.isenabled()  # the other thread's pause is still open
        release.set()
        t.join(5)
        assert gc.isenabled()

    def test_replaced_snapshot_is_released_intact(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The reaper lets go of a replaced snapshot without changing it: a Check still
        deciding on it gets the old answer."""
        from authz.engine import decide
        from authz.loader import build_policy_set
        from authz.model import Destination, Identity, Protocol
        from authz.store import _REAPER

        monkeypatch.setattr(type(_REAPER), "DELAY", 0.0)
        path = Path(self.tmp) / "p.yaml"
        write(path, configmap("a"))
        store = PolicyStore()
        store.publish(build_policy_set(load_path(path).policies))
        old = store.current
        assert old is not None
        released = _REAPER.released
        write(path, configmap("a", "[api.leng.com]"))
        store.publish(build_policy_set(load_path(path).policies))
        deadline = time.monotonic() + 10
        while _REAPER.released == released and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _REAPER.released > released
        who = Identity(principal="spiffe://cluster.local/ns/shop/sa/default", source_ip="")
        where = Destination(port=443, protocol=Protocol.TLS, sni="api.kadath.io")
        assert decide(old, who, where).allowed
        assert store.current is not None and not decide(store.current, who, where).allowed

    @pytest.fixture(autouse=True)
    def _tmp(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    def test_publish_leaves_the_collector_on(self) -> None:
        """A publish pauses collection while compiling, and only then."""
        from authz.loader import build_policy_set

        PolicyStore().publish(build_policy_set([]))
        assert gc.isenabled()
