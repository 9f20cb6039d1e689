"""authz.sources: the directory policy source and the Pod-manifest workload source."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from authz.model import ConfigMapRef
from authz.observe.metrics import Metrics
from authz.sources import DirectorySource, WorkloadFileSource, pods_in, yaml_files
from authz.store import PolicyStore
from authz.testing.policies import policy_configmap
from authz.workloads import WorkloadIndex

pytestmark = pytest.mark.timeout(30)


def configmap(name: str, hosts: str = "[api.kadath.io]", namespace: str = "shop") -> str:
    return policy_configmap(name, namespace, f"- name: r\n  hosts: {hosts}")


BROKEN_HOSTS = '["*.*.io"]'


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # Some filesystems keep coarse mtimes; the size or inode may not change either.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


class Source:
    def __init__(self, path: Path) -> None:
        self.store = PolicyStore()
        self.errors: list[str] = []
        self.metrics = Metrics()  # a fresh registry: what this source counted, and only that
        self.source = DirectorySource(path, metrics=self.metrics)
        self.source.start(self.store, self.errors.append)

    def hosts(self) -> dict[str, tuple[str, ...]]:
        snap = self.store.current
        assert snap is not None
        return {str(p.source): p.rules[0].hosts for p in snap.policy_set.policies}

    def policy_errors(self) -> float:
        return self.metrics.value("egress_authz_policy_errors_total", {"source": "directory"})

    @property
    def revision(self) -> int:
        return self.store.current.revision if self.store.current else 0

    def stop(self) -> None:
        self.source.stop()


@pytest.fixture
def make(tmp_path: Path):
    made: list[Source] = []

    def _make(path: Path | None = None) -> Source:
        s = Source(path or tmp_path)
        made.append(s)
        return s

    yield _make
    for s in made:
        s.stop()


class TestDirectorySource:
    def test_loads_and_is_ready(self, tmp_path: Path, make) -> None:
        """The first load is synchronous: ready, revision 1, every ConfigMap."""
        write(tmp_path / "a.yaml", configmap("a"))
        write(tmp_path / "b.yml", configmap("b", "[b.kadath.io]"))
        s = make()
        assert s.source.ready() and s.revision == 1
        assert s.hosts() == {"shop/a": ("api.kadath.io",), "shop/b": ("b.kadath.io",)}

    def test_unchanged_reload_does_not_bump_revision(self, tmp_path: Path, make) -> None:
        """Nothing changed, nothing published: the revision counts real changes."""
        write(tmp_path / "a.yaml", configmap("a"))
        s = make()
        s.source.reload()
        assert s.revision == 1

    def test_per_configmap_last_good(self, tmp_path: Path, make) -> None:
        """In a multi-document file, a broken ConfigMap keeps its last good version
        while its valid neighbour moves on."""
        f = tmp_path / "all.yaml"
        write(f, configmap("a") + "---\n" + configmap("b", "[b.kadath.io]"))
        s = make()
        write(f, configmap("a", "[new.kadath.io]") + "---\n" + configmap("b", BROKEN_HOSTS))
        s.source.reload()
        assert s.hosts() == {"shop/a": ("new.kadath.io",), "shop/b": ("b.kadath.io",)}
        assert len(s.errors) == 1 and "shop/b" in s.errors[0] and "*.*.io" in s.errors[0]
        assert s.policy_errors() == 1

    def test_bad_yaml_keeps_the_whole_file(self, tmp_path: Path, make) -> None:
        """A file that cannot be parsed keeps everything it last gave."""
        f = tmp_path / "a.yaml"
        write(f, configmap("a"))
        s = make()
        write(f, "kind: [unclosed\n")
        s.source.reload()
        assert s.hosts() == {"shop/a": ("api.kadath.io",)}
        assert s.revision == 1 and "bad YAML" in s.errors[0]
        assert s.policy_errors() == len(s.errors) == 1

    def test_removed_file_and_removed_configmap_withdraw(self, tmp_path: Path, make) -> None:
        """Deleting a file or a ConfigMap from a valid file withdraws its policy."""
        write(tmp_path / "a.yaml", configmap("a") + "---\n" + configmap("b"))
        write(tmp_path / "c.yaml", configmap("c"))
        s = make()
        (tmp_path / "c.yaml").unlink()
        write(tmp_path / "a.yaml", configmap("a"))
        s.source.reload()
        assert set(s.hosts()) == {"shop/a"}

    def test_nothing_valid_at_start_stays_unready(self, tmp_path: Path, make) -> None:
        """Only broken files: nothing is published, so the service denies and is not ready."""
        write(tmp_path / "a.yaml", configmap("a", BROKEN_HOSTS))
        s = make()
        assert not s.source.ready() and s.store.current is None
        write(tmp_path / "a.yaml", configmap("a"))
        s.source.reload()
        assert s.source.ready() and s.revision == 1

    def test_empty_directory_is_an_empty_policy(self, tmp_path: Path, make) -> None:
        """No files at all is a valid (deny-all) policy: ready."""
        s = make()
        assert s.source.ready() and s.hosts() == {}

    def test_same_configmap_in_two_files_counts_once(self, tmp_path: Path, make) -> None:
        """A duplicate is reported and the first file (by name) wins."""
        write(tmp_path / "1.yaml", configmap("a"))
        write(tmp_path / "2.yaml", configmap("a", "[other.kadath.io]"))
        s = make()
        assert s.hosts() == {"shop/a": ("api.kadath.io",)}
        assert any("also defined" in e for e in s.errors)

    def test_configmap_volume_layout(self, tmp_path: Path, make) -> None:
        """A mounted ConfigMap (..data symlink swap) is read once and followed on update."""
        v1 = tmp_path / "..2026_01"
        v1.mkdir()
        write(v1 / "policy.yaml", configmap("a"))
        (tmp_path / "..data").symlink_to(v1.name)
        (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
        assert yaml_files(tmp_path) == [tmp_path / "policy.yaml"]
        s = make()
        assert s.hosts() == {"shop/a": ("api.kadath.io",)}
        v2 = tmp_path / "..2026_02"
        v2.mkdir()
        write(v2 / "policy.yaml", configmap("a", "[v2.kadath.io]"))
        (tmp_path / "..data_tmp").symlink_to(v2.name)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")  # what the kubelet does
        s.source.reload()
        assert s.hosts() == {"shop/a": ("v2.kadath.io",)}

    def test_polling_follows_changes(self, tmp_path: Path, make) -> None:
        """Without calling reload: a change is published by the poller within a second."""
        write(tmp_path / "a.yaml", configmap("a"))
        s = make()
        write(tmp_path / "a.yaml", configmap("a", "[polled.kadath.io]"))
        deadline = time.monotonic() + 1.0
        while s.revision < 2:
            assert time.monotonic() < deadline, "change not picked up within a second"
            time.sleep(0.02)
        assert s.hosts() == {"shop/a": ("polled.kadath.io",)}

    def test_single_file_path(self, tmp_path: Path, make) -> None:
        """--policies may name one file."""
        write(tmp_path / "a.yaml", configmap("a"))
        assert set(make(tmp_path / "a.yaml").hosts()) == {"shop/a"}


POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec: {{serviceAccountName: cart}}
status: {{phase: {phase}, podIP: {ip}}}
"""


def pod(name: str, ip: str, phase: str = "Running") -> str:
    return POD.format(name=name, ip=ip, phase=phase)


class TestWorkloadFileSource:
    def test_pods_and_list_dumps(self, tmp_path: Path) -> None:
        """Single Pods, multi-document files and `kubectl get pods -o yaml` Lists."""
        write(tmp_path / "one.yaml", pod("a", "10.0.0.1") + "---\n" + pod("b", "10.0.0.2"))
        indented = "".join("  " + line + "\n" for line in pod("c", "10.0.0.3").splitlines())
        write(tmp_path / "list.yaml", "apiVersion: v1\nkind: List\nitems:\n- " + indented[2:])
        index = WorkloadIndex()
        src = WorkloadFileSource(tmp_path, index)
        src.start(on_error=pytest.fail)
        src.stop()
        c = index.lookup("10.0.0.3")
        assert c is not None and (c.namespace, c.service_account, c.name) == ("shop", "cart", "c")
        assert dict(c.labels) == {"app": "c"}
        assert index.pod_count == 3

    def test_only_running_pods_count(self, tmp_path: Path) -> None:
        """A Pending or finished Pod carries no identity."""
        write(tmp_path / "p.yaml", pod("a", "10.0.0.1", "Succeeded"))
        index = WorkloadIndex()
        WorkloadFileSource(tmp_path, index).reload()
        assert index.lookup("10.0.0.1") is None

    def test_broken_file_keeps_its_pods(self, tmp_path: Path) -> None:
        """A file caught half-written keeps the Pods it last gave."""
        f = tmp_path / "p.yaml"
        write(f, pod("a", "10.0.0.1"))
        index = WorkloadIndex()
        errors: list[str] = []
        src = WorkloadFileSource(tmp_path, index)
        src._on_error = errors.append
        src.reload()
        write(f, "kind: [unclosed\n")
        src.reload()
        assert index.lookup("10.0.0.1") is not None and errors
        f.unlink()
        src.reload()
        assert index.lookup("10.0.0.1") is None

    def test_pods_in(self) -> None:
        """Pods are found in Pods, Lists and PodLists; other kinds are ignored."""
        p = {"kind": "Pod", "metadata": {}}
        assert list(pods_in(p)) == [p]
        assert list(pods_in({"kind": "PodList", "items": [p, {"kind": "Service"}]})) == [p]
        assert list(pods_in({"kind": "ConfigMap"})) == []
        assert list(pods_in(None)) == []


def test_configmap_ref_in_errors_names_the_file(tmp_path: Path) -> None:
    """Errors say which file and which ConfigMap to fix."""
    write(tmp_path / "x.yaml", configmap("bad", BROKEN_HOSTS))
    errors: list[str] = []
    source = DirectorySource(tmp_path)
    source.start(PolicyStore(), errors.append)
    source.stop()
    assert str(tmp_path / "x.yaml") in errors[0] and str(ConfigMapRef("shop", "bad")) in errors[0]
