"""Where policies and workloads come from: pluggable sources feeding the store.

A PolicySource publishes whole PolicySets into the PolicyStore; the Check
path only ever reads `store.current`. This module holds the interface and the
local sources (a file or directory of YAML, polled for changes); the
Kubernetes source (a ConfigMap watch) implements the same interface.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from .echo import shown
from .hosts import DEFAULT_CLUSTER_DOMAIN
from .loader import DEFAULT_CLUSTER_NAMESPACE, build_policy_set, is_policy_file_name
from .model import ConfigMapRef, NamespacePolicy, Workload
from .observe.metrics import METRICS, Metrics
from .offload import load_file
from .store import PolicyStore
from .workloads import WorkloadIndex, workload_from_pod
from .yamlload import FILE_LIMITS, YamlError, load_all

log = logging.getLogger(__name__)

ErrorHandler = Callable[[str], None]

POLL_INTERVAL = 0.1  # seconds: a changed file is in force well within a second
START_ATTEMPTS = 5  # synchronous loads tried at start while files are changing


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

SETTLE = POLL_INTERVAL  # seconds a change must stay still before it is read (>= 1 poll)
DATA_LINK = "..data"  # a mounted ConfigMap: the kubelet swaps this link atomically


def yaml_files(path: Path) -> list[Path]:
    """The YAML files under `path` (itself, if it is a file), in a stable order.

    Hidden names are skipped: a ConfigMap mounted as a volume keeps its real
    files under `..data/` and `..<timestamp>/`, and exposes each key as a
    symlink at the top, which is what we read. So are editors' temp and swap
    files (`.x.swp`, `x~`, `#x#`, vim's `4913`): see `is_policy_file_name`.
    """
    if path.is_file():
        return [path]
    found: list[Path] = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += (Path(root) / f for f in sorted(files) if is_policy_file_name(f))
    return found


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows symlinks: a ConfigMap volume swaps their target
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def fingerprint(path: Path) -> Fingerprint:
    """Every file's stat key, plus the target of a ConfigMap volume's `..data` link:
    equal fingerprints before and after a read mean one consistent snapshot."""
    keys = []
    for f in [path / DATA_LINK, *yaml_files(path)]:
        key = _stat_key(f)
        if key is not None:
            keys.append((str(f), *key))
    return tuple(keys)


class Poller:
    """Calls `on_change()` from a daemon thread once `path` has changed and then stayed
    still for `settle` seconds (debounce: a file being written keeps changing).

    `on_change` returns False when it found the files changing under it and applied
    nothing; the poller then tries again. Writers should still replace files
    atomically (write a temp file, rename it over): a writer that pauses for longer
    than `settle` mid-write cannot be told from a finished one.
    """

    def __init__(self, path: Path, on_change: Callable[[], bool | None], interval: float,
                 settle: float | None = None) -> None:
        self.path = path
        self.interval = interval
        self.settle = SETTLE if settle is None else settle
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._applied: Fingerprint | None = None

    def mark(self, applied: Fingerprint | None = None) -> None:
        """Remember a state as applied (default: the current one)."""
        self._applied = fingerprint(self.path) if applied is None else applied

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
        # Still = the same fingerprint on this many polls in a row after the one
        # that saw it first: counted in polls, not clock time, so that timer
        # jitter can neither shorten the wait nor stretch one poll into two.
        polls_needed = max(1, math.ceil(self.settle / self.interval - 1e-9))
        seen: Fingerprint | None = None
        still = 0
        while not self._stop.wait(self.interval):
            try:
                now = fingerprint(self.path)
                if now == self._applied:
                    seen = None
                    continue
                if now != seen:  # still changing: wait for it to settle
                    seen, still = now, 0
                    continue
                still += 1
                if still < polls_needed:
                    continue
                if self._on_change() is not False:
                    seen = None
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
    (or is empty, as a file being rewritten is for a moment) keeps everything
    it last gave. A ConfigMap removed from a readable file, or a deleted file,
    withdraws its policy. A change is read as one snapshot of the directory:
    if anything changed while it was read, nothing is applied and the poller
    reads it again.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        cluster_namespace: str = DEFAULT_CLUSTER_NAMESPACE,
        cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
        interval: float = POLL_INTERVAL,
        settle: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = f"directory {self.path}"
        self.metrics = metrics or METRICS  # serve hands the process's own; tests a fresh one
        self.cluster_namespace = cluster_namespace
        self.cluster_domain = cluster_domain
        self._poller = Poller(self.path, self.reload, interval, settle)
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
        for _ in range(START_ATTEMPTS):  # files changing right now: the poller catches up
            if self.reload():
                break
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()

    def ready(self) -> bool:
        return self._published is not None

    def reload(self) -> bool:
        """Load changed files; publish when the accepted policies changed. False when
        the directory changed while it was read: then nothing was applied."""
        assert self._store is not None, "start() first"
        with self._lock:
            before = fingerprint(self.path)
            exists = self.path.exists()
            files = yaml_files(self.path) if exists else []
            states: dict[str, _FileState] = {}
            reports: list[str] = []
            for f in files:
                states[str(f)], report = self._load_file(f, self._files.get(str(f)))
                if report is not None:
                    reports.append(report)
            if fingerprint(self.path) != before:
                log.info("%s changed while being read; reading it again", self.path)
                return False
            for gone in set(self._files) - set(states):
                log.info("%s removed: its policies are withdrawn", gone)
            self._files = states
            self._poller.mark(before)
            for report in reports:
                self.metrics.policy_errors.labels("directory").inc()
                self._on_error(report)

            policies = self._merge()
            if policies == self._published:
                return True
            if self._published is None and not policies and (reports or not exists):
                # Nothing valid yet (or a path not mounted yet): stay unready
                # and deny all, rather than declare an empty policy loaded.
                # An empty directory that exists is a policy: deny everything.
                return True
            snapshot = self._store.publish(build_policy_set(policies))
            self._published = policies
            log.info(
                "policy revision %d: %d policy ConfigMap(s) from %s",
                snapshot.revision, len(policies), self.path,
            )
            return True

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

    def _load_file(self, f: Path, previous: _FileState | None
                   ) -> tuple[_FileState, str | None]:
        """One file's new state (the previous one if it did not change) and, when it
        had problems, the report to make. Changes nothing on `self`."""
        previous = previous or _FileState()
        key = _stat_key(f)
        if key is not None and key == previous.key:
            return previous, None
        state = _FileState()
        state.key = key  # unchanged, it would give the same problems again
        try:
            # big files are parsed in another process
            result = load_file(f, cluster_namespace=self.cluster_namespace,
                               cluster_domain=self.cluster_domain)
        except Exception as e:  # one surprising file must not stop the others
            log.exception("loading %s failed", f)
            state.good = dict(previous.good)
            return state, self._report(f, [f"{f}: cannot be loaded: {shown(str(e))}"],
                                       list(state.good))
        for warning in result.warnings:
            log.warning("%s", warning)
        if not result.problems and result.documents == 0:
            # Empty: what a writer that truncates and then writes leaves for a
            # moment. Keep what it gave; deleting the file withdraws it.
            state.good = dict(previous.good)
            if not state.good:
                return state, None
            return state, self._report(
                f, [f"{f}: file is empty; delete it to withdraw its policies"], list(state.good))
        good: dict[ConfigMapRef, NamespacePolicy] = {}
        kept: list[ConfigMapRef] = []
        for ref, outcome in result.by_ref.items():
            if isinstance(outcome, NamespacePolicy):
                good[ref] = outcome
            elif ref in previous.good:
                good[ref] = previous.good[ref]
                kept.append(ref)
        if result.problems and not result.by_ref:
            # Unreadable file (bad YAML, I/O error): keep all it last gave.
            good = dict(previous.good)
            kept = list(good)
        state.good = good
        if not result.problems:
            return state, None
        return state, self._report(f, result.problems, kept)

    @staticmethod
    def _report(f: Path, problems: list[str], kept: list[ConfigMapRef]) -> str:
        note = f"; keeping the last good version of {', '.join(map(str, kept))}" if kept else ""
        return f"{f}: {len(problems)} problem(s){note}:\n  " + "\n  ".join(problems)


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
    """Every live Pod with an IP in one file; raises OSError or YamlError."""
    with path.open("rb") as stream:  # never read more than the limit
        raw = stream.read(FILE_LIMITS.max_bytes + 1)
    if len(raw) > FILE_LIMITS.max_bytes:
        raise YamlError(f"file is over the limit of {FILE_LIMITS.max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlError(f"not UTF-8 text ({e.reason} at byte {e.start})") from e
    workloads: list[Workload] = []
    for document in load_all(text, FILE_LIMITS):
        for pod in pods_in(document):
            try:
                w = workload_from_pod(pod)
            except (AttributeError, TypeError) as e:  # e.g. `metadata: x`
                raise YamlError(f"a Pod is malformed: {shown(str(e), quote=False)}") from e
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
                except (OSError, YamlError) as e:
                    self._on_error(f"workloads: {f}: {e}")
            for gone in set(self._good) - seen:
                del self._good[gone]
            workloads = [w for name in sorted(self._good) for w in self._good[name][1]]
            self.index.replace_all(workloads)
            log.info("workloads: %d Pod(s) from %s", len(workloads), self.path)
