"""Where policies and workloads come from: pluggable sources feeding the store.

A PolicySource publishes whole PolicySets into the PolicyStore; the Check
path only ever reads `store.current`. This module holds the interface and the
local sources (a file or directory of YAML, polled for changes); the
Kubernetes source (a ConfigMap watch) implements the same interface.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import yaml

from .loader import DEFAULT_CLUSTER_NAMESPACE, build_policy_set
from .metrics import POLICY_ERRORS
from .model import ConfigMapRef, NamespacePolicy, Workload
from .offload import load_file
from .store import PolicyStore
from .workloads import WorkloadIndex, workload_from_pod

log = logging.getLogger(__name__)

ErrorHandler = Callable[[str], None]

POLL_INTERVAL = 0.2  # seconds: a changed file is in force well within a second
YAML_SUFFIXES = (".yaml", ".yml", ".json")


class PolicySource(Protocol):
    """Something that publishes PolicySets into a store until stopped."""

    name: str

    def start(self, store: PolicyStore, on_error: ErrorHandler) -> None:
        """Load once (synchronously where possible), publish, then follow changes.

        Problems that do not stop the source (a rejected file, a lost watch)
        are reported through `on_error` and never widen access: the source
        keeps the last good policy of whatever failed.
        """

    def stop(self) -> None:
        """Stop following changes; the store keeps the last published set."""

    def ready(self) -> bool:
        """True once a PolicySet has been published."""


# --------------------------------------------------------------------------
# Polling, without extra dependencies


Fingerprint = tuple[tuple[str, int, int, int], ...]


def yaml_files(path: Path) -> list[Path]:
    """The YAML files under `path` (itself, if it is a file), in a stable order.

    Names starting with "." are skipped: a ConfigMap mounted as a volume keeps
    its real files under `..data/` and `..<timestamp>/`, and exposes each key
    as a symlink at the top, which is what we read.
    """
    if path.is_file():
        return [path]
    found: list[Path] = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += (
            Path(root) / f for f in sorted(files)
            if not f.startswith(".") and f.endswith(YAML_SUFFIXES)
        )
    return found


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows symlinks: a ConfigMap volume swaps their target
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def fingerprint(path: Path) -> Fingerprint:
    keys = []
    for f in yaml_files(path):
        key = _stat_key(f)
        if key is not None:
            keys.append((str(f), *key))
    return tuple(keys)


class Poller:
    """Calls `on_change()` from a daemon thread whenever `path` changes."""

    def __init__(self, path: Path, on_change: Callable[[], None], interval: float) -> None:
        self.path = path
        self.interval = interval
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: Fingerprint | None = None

    def mark(self) -> None:
        """Remember the current state as seen (call right before loading)."""
        self._last = fingerprint(self.path)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"poll {self.path}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                now = fingerprint(self.path)
                if now != self._last:
                    self._last = now
                    self._on_change()
            except Exception:  # a reload bug must not end the watch
                log.exception("reloading %s failed", self.path)


# --------------------------------------------------------------------------
# Policies from a directory


class _FileState:
    """What one policy file last contributed: its stat key and, per ConfigMap,
    the last version that passed validation."""

    __slots__ = ("good", "key")

    def __init__(self) -> None:
        self.key: tuple[int, int, int] | None = None
        self.good: dict[ConfigMapRef, NamespacePolicy] = {}


class DirectorySource:
    """Policy ConfigMaps from a YAML file or a directory of them.

    Each changed file is loaded on its own, and each ConfigMap in it keeps
    its last version that passed validation when a new one does not, like a
    ConfigMap in the Kubernetes source; a file that cannot be parsed at all
    keeps everything it last gave. A ConfigMap removed from a readable file,
    or a deleted file, withdraws its policy.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cluster_namespace: str = DEFAULT_CLUSTER_NAMESPACE,
        interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = Path(path)
        self.name = f"directory {self.path}"
        self.cluster_namespace = cluster_namespace
        self._poller = Poller(self.path, self.reload, interval)
        self._files: dict[str, _FileState] = {}
        self._published: list[NamespacePolicy] | None = None
        self._store: PolicyStore | None = None
        self._on_error: ErrorHandler = log.error
        self._lock = threading.Lock()

    def start(self, store: PolicyStore, on_error: ErrorHandler) -> None:
        self._store = store
        self._on_error = on_error
        if not self.path.exists():
            on_error(f"policy path {self.path} does not exist; waiting for it")
        self.reload()
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()

    def ready(self) -> bool:
        return self._published is not None

    def reload(self) -> None:
        """Load changed files; publish when the accepted policies changed."""
        assert self._store is not None, "start() first"
        with self._lock:
            self._poller.mark()
            exists = self.path.exists()
            files = yaml_files(self.path) if exists else []
            rejected = 0
            for f in files:
                rejected += self._load_file(f)
            for gone in set(self._files) - {str(f) for f in files}:
                log.info("%s removed: its policies are withdrawn", gone)
                del self._files[gone]

            policies = self._merge()
            if policies == self._published:
                return
            if self._published is None and not policies and (rejected or not exists):
                # Nothing valid yet (or a path not mounted yet): stay unready
                # and deny all, rather than declare an empty policy loaded.
                # An empty directory that exists is a policy: deny everything.
                return
            snapshot = self._store.publish(build_policy_set(policies))
            self._published = policies
            log.info(
                "policy revision %d: %d policy ConfigMap(s) from %s",
                snapshot.revision, len(policies), self.path,
            )

    def _merge(self) -> list[NamespacePolicy]:
        """All files' policies; a ConfigMap defined in two files counts once."""
        policies: dict[ConfigMapRef, NamespacePolicy] = {}
        for name in sorted(self._files):
            for ref, policy in self._files[name].good.items():
                if ref in policies:
                    self._on_error(f"{name}: {ref} is also defined in an earlier file; ignored")
                    continue
                policies[ref] = policy
        return list(policies.values())

    def _load_file(self, f: Path) -> int:
        """Reload one file if it changed; returns 1 when it had problems."""
        state = self._files.setdefault(str(f), _FileState())
        key = _stat_key(f)
        if key is not None and key == state.key:
            return 0
        result = load_file(f, cluster_namespace=self.cluster_namespace)  # big: another process
        for warning in result.warnings:
            log.warning("%s", warning)
        good: dict[ConfigMapRef, NamespacePolicy] = {}
        kept: list[str] = []
        for ref, outcome in result.by_ref.items():
            if isinstance(outcome, NamespacePolicy):
                good[ref] = outcome
            elif ref in state.good:
                good[ref] = state.good[ref]
                kept.append(str(ref))
        if result.problems and not result.by_ref:
            # Unreadable file (bad YAML, I/O error): keep all it last gave.
            good = dict(state.good)
            kept = [str(ref) for ref in good]
        state.good = good
        state.key = key  # unchanged, it would give the same problems again
        if not result.problems:
            return 0
        POLICY_ERRORS.inc("directory")
        note = f"; keeping the last good version of {', '.join(kept)}" if kept else ""
        self._on_error(
            f"{f}: {len(result.problems)} problem(s){note}:\n  " + "\n  ".join(result.problems)
        )
        return 1


# --------------------------------------------------------------------------
# Workloads from Pod manifests


def pods_in(document: Any) -> Iterator[dict[str, Any]]:
    """Pods in one YAML document: a Pod, or a List/PodList (`kubectl get pods -o yaml`)."""
    if not isinstance(document, dict):
        return
    kind = document.get("kind")
    if kind == "Pod":
        yield document
    elif kind in ("List", "PodList") or (kind is None and "items" in document):
        for item in document.get("items") or ():
            if isinstance(item, dict) and item.get("kind", "Pod") == "Pod":
                yield item


def load_pod_file(path: Path) -> list[Workload]:
    """Every live Pod with an IP in one file; raises OSError or YAMLError."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # dumps can be large
    workloads: list[Workload] = []
    with path.open() as stream:
        for document in yaml.load_all(stream, Loader=loader):
            for pod in pods_in(document):
                w = workload_from_pod(pod)
                if w is not None:
                    workloads.append(w)
    return workloads


class WorkloadFileSource:
    """Feeds a WorkloadIndex from Pod manifests on disk, following changes.

    As with policies, a file that fails to parse (often: caught half-written)
    keeps the Pods it last gave. A Kubernetes Pod watch feeds the same index
    with upsert/remove instead.
    """

    def __init__(
        self, path: str | os.PathLike[str], index: WorkloadIndex, *, interval: float = POLL_INTERVAL
    ) -> None:
        self.path = Path(path)
        self.index = index
        self._poller = Poller(self.path, self.reload, interval)
        self._good: dict[str, tuple[tuple[int, int, int] | None, list[Workload]]] = {}
        self._on_error: ErrorHandler = log.error
        self._lock = threading.Lock()

    def start(self, on_error: ErrorHandler) -> None:
        self._on_error = on_error
        if not self.path.exists():
            on_error(f"workloads path {self.path} does not exist; waiting for it")
        self.reload()
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()

    def reload(self) -> None:
        with self._lock:
            self._poller.mark()
            files = yaml_files(self.path) if self.path.exists() else []
            seen = {str(f) for f in files}
            for f in files:
                key = _stat_key(f)
                previous = self._good.get(str(f))
                if previous is not None and previous[0] == key:
                    continue
                try:
                    self._good[str(f)] = (key, load_pod_file(f))
                except (OSError, yaml.YAMLError) as e:
                    self._on_error(f"workloads: {f}: {e}")
            for gone in set(self._good) - seen:
                del self._good[gone]
            workloads = [w for name in sorted(self._good) for w in self._good[name][1]]
            self.index.replace_all(workloads)
            log.info("workloads: %d Pod(s) from %s", len(workloads), self.path)
