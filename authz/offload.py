"""Large policy files are parsed and validated in a child process, beside the serving one.

In file mode a reload parses YAML and validates every ConfigMap: pure-Python work
that allocates millions of short-lived objects. Done in the serving process it
competes with the Check threads for the GIL and sets off full garbage collections
of a growing heap (measured: Check p99 785 ms during a 46 s reload of an 11 MB
file). Here a child process (`python -m authz.offload`, never a fork of the gRPC
process) does that work and writes one pickle per ConfigMap to its stdout; the
parent reads them while blocked in I/O (no GIL held) and unpickles them one small
piece at a time, yielding the GIL in between. Only the result crosses over, so
compiling and publishing stay where they were (authz/store.py).

The child parses hostile input: if it dies, hangs or writes garbage, the file is
reported as unreadable and the caller keeps what the file last gave.
"""

from __future__ import annotations

import copyreg
import gc
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from .hosts import DEFAULT_CLUSTER_DOMAIN
from .loader import LoadResult, load_path
from .policy import PolicyError
from .store import gc_paused

OFFLOAD_MIN_BYTES = 512 * 1024  # below this a child's start-up (~0.3 s) costs more than it saves
CHILD_TIMEOUT = 600.0  # seconds; a child parsing longer than this is killed
CHILD_ARGV = [sys.executable, "-m", "authz.offload"]  # + path, cluster namespace, domain
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _mapping_proxy(items: dict[Any, Any]) -> MappingProxyType[Any, Any]:
    return MappingProxyType(items)


# Label selectors hold read-only mappings; pickle cannot name their type on its own.
copyreg.pickle(MappingProxyType, lambda m: (_mapping_proxy, (dict(m),)))


def load_file(path: Path, *, cluster_namespace: str,
              cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
              min_bytes: int | None = None) -> LoadResult:
    """`load_path(path)`, in a child process when the file is at least `min_bytes`
    (default OFFLOAD_MIN_BYTES)."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if size < (OFFLOAD_MIN_BYTES if min_bytes is None else min_bytes):
        return load_path(path, cluster_namespace=cluster_namespace, cluster_domain=cluster_domain)
    return _load_in_child(path, cluster_namespace, cluster_domain)


def _load_in_child(path: Path, cluster_namespace: str, cluster_domain: str) -> LoadResult:
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child cannot block
        proc = subprocess.Popen(
            [*CHILD_ARGV, str(path), cluster_namespace, cluster_domain],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
        )
        expired = threading.Event()

        def expire() -> None:  # a hung child: killing it ends our read
            expired.set()
            proc.kill()

        timer = threading.Timer(CHILD_TIMEOUT, expire)
        timer.start()
        try:
            assert proc.stdout is not None
            with proc.stdout, gc_paused():  # what arrives is acyclic: no collections
                result = _read(proc.stdout)
                # Out of the collector's generations, or the first collection after the
                # pause walks all of it while every Check thread waits (a 0.7 s stall).
                gc.freeze()
            code = proc.wait()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                IndexError) as e:
            proc.kill()
            code = proc.wait()
            why = (f"parsing took over {CHILD_TIMEOUT:g} s" if expired.is_set() else
                   f"the parsing process sent no result ({type(e).__name__}, exit code {code})")
            return _failed(path, why, _tail(err))
        finally:
            timer.cancel()
        if code != 0:
            return _failed(path, f"the parsing process exited with code {code}", _tail(err))
        return result


def _read(stream: IO[bytes]) -> LoadResult:
    """Frames: ("policy", ref, NamespacePolicy) | ("error", ref, source, problems) |
    ("problems", [...]) | ("warnings", [...]) | ("files", [...]) | ("end",)."""
    result = LoadResult()
    unpickler = pickle.Unpickler(stream)
    while True:
        frame = unpickler.load()  # one ConfigMap at a time: a short hold of the GIL
        kind = frame[0]
        if kind == "policy":
            result.by_ref[frame[1]] = frame[2]
            result.policies.append(frame[2])
        elif kind == "error":
            result.by_ref[frame[1]] = PolicyError(frame[2], frame[3])
        elif kind in ("problems", "warnings"):
            getattr(result, kind).extend(frame[1])
        elif kind == "files":
            result.files.extend(Path(p) for p in frame[1])
        elif kind == "documents":  # 0 means an empty file: the directory source keeps its last
            result.documents = frame[1]
        elif kind == "end":
            return result
        else:
            raise ValueError(f"unknown frame {kind!r}")
        time.sleep(0)  # let a waiting Check thread take the GIL now


def _tail(err: IO[bytes]) -> str:
    """The child's last stderr line (its exception), capped."""
    err.seek(0, os.SEEK_END)
    err.seek(max(0, err.tell() - 4096))
    lines = err.read().decode("utf-8", "replace").strip().splitlines()
    return lines[-1][:300] if lines else ""


def _failed(path: Path, why: str, detail: str) -> LoadResult:
    said = f": {detail}" if detail else ""
    return LoadResult(problems=[f"{path}: cannot load: {why}{said}"], files=[path])


def _child(path: str, cluster_namespace: str, cluster_domain: str, out: IO[bytes]) -> None:
    result = load_path(path, cluster_namespace=cluster_namespace, cluster_domain=cluster_domain)
    dump = pickle.Pickler(out, protocol=_PROTOCOL).dump
    for ref, outcome in result.by_ref.items():
        if isinstance(outcome, PolicyError):
            dump(("error", ref, outcome.source, list(outcome.problems)))
        else:
            dump(("policy", ref, outcome))
    dump(("problems", result.problems))
    dump(("warnings", result.warnings))
    dump(("files", [str(f) for f in result.files]))
    dump(("documents", result.documents))
    dump(("end",))
    out.flush()


if __name__ == "__main__":
    # Through the package, not __main__: pickles must name authz.offload._mapping_proxy.
    from authz.offload import _child as child

    child(sys.argv[1], sys.argv[2], sys.argv[3],
          os.fdopen(sys.stdout.fileno(), "wb", closefd=False))
