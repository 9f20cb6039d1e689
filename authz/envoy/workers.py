"""`serve --workers N`: N serving processes on one port, one supervisor.

Python answers one Check at a time per process (the GIL), so a pod uses
several cores by running several processes that each bind the gRPC port with
SO_REUSEPORT; the kernel spreads Envoy's connections over them. They share
nothing: each loads the policies and workloads itself and reloads them on
its own. The supervisor holds no gRPC state (gRPC and fork do not mix), only
restarts a worker that dies and forwards SIGTERM for a graceful drain.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("egress-authz")

RESTART_BACKOFF = 1.0

ArgvFor = Callable[[int, int], list[str]]  # (worker index, ready fd) -> argv


def _spawn(argv_for: ArgvFor, index: int) -> tuple[subprocess.Popen[bytes], int]:
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen(argv_for(index, write_fd), pass_fds=(write_fd,))
    finally:
        os.close(write_fd)
    return proc, read_fd


def _await_ready(procs: list[subprocess.Popen[bytes]], fds: list[int],
                 stop: threading.Event) -> list[int] | None:
    """Each worker's policy revision once all have reported ready, or None
    when one exited first or we were told to stop.

    A worker reports only after its first policy load and bind, which takes
    as long as the load does (an API server outage: until it ends), so there
    is no deadline here: meanwhile the port is closed and the gateway denies."""
    revisions: dict[int, int] = {}
    buffers = {fd: b"" for fd in fds}
    while len(revisions) < len(fds):
        if any(p.poll() is not None for p in procs) or stop.is_set():
            return None
        waiting = [fd for fd in fds if fd not in revisions]
        readable, _, _ = select.select(waiting, [], [], 0.2)
        for fd in readable:
            chunk = os.read(fd, 64)
            buffers[fd] += chunk
            if b"\n" in buffers[fd]:
                word, _, rev = buffers[fd].partition(b"\n")[0].partition(b" ")
                revisions[fd] = int(rev or 0) if word == b"ready" else 0
            elif not chunk:  # closed without a word: the worker died
                return None
    return [revisions[fd] for fd in fds]


def supervise(args: argparse.Namespace, argv_for: ArgvFor) -> int:
    """Run args.workers serving processes until SIGTERM/SIGINT."""
    n = args.workers
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    started = [_spawn(argv_for, i) for i in range(n)]
    procs = [p for p, _ in started]
    fds = [fd for _, fd in started]
    revisions = _await_ready(procs, fds, stop)
    for fd in fds:
        os.close(fd)
    if revisions is None:
        if stop.is_set():
            return _terminate(procs, grace=args.shutdown_grace)
        log.error("a worker failed to start; stopping the others")
        _terminate(procs, grace=args.shutdown_grace)
        return 1
    revision = min(revisions)
    loaded = (
        f"policy revision {revision}" if revision
        else "no policy loaded: denying everything until one is"
    )
    print(
        f"egress-authz: serving Check on {args.grpc_address} ({loaded}; {n} workers)",
        file=sys.stderr, flush=True,
    )

    while not stop.wait(0.5):
        for i, proc in enumerate(procs):
            code = proc.poll()
            if code is None or stop.is_set():
                continue
            log.error("worker %d exited with %s; restarting it", i, code)
            time.sleep(RESTART_BACKOFF)
            procs[i], fd = _spawn(argv_for, i)
            os.close(fd)  # nobody waits for a restarted worker's report
    log.info("stopping %d workers", n)
    return _terminate(procs, grace=args.shutdown_delay + args.shutdown_grace)


def _terminate(procs: list[subprocess.Popen[bytes]], grace: float) -> int:
    """SIGTERM every worker (each drains its in-flight Checks), then wait."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5.0
    worst = 0
    for p in procs:
        try:
            code = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        worst = max(worst, abs(code))
    return 0 if worst in (0, signal.SIGTERM) else 1
