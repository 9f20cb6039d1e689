"""`serve --workers N`: N serving processes on one port, one supervisor.

Python answers one Check at a time per process (the GIL), so a pod uses
several cores by running several processes that each bind the gRPC port with
SO_REUSEPORT; the kernel spreads Envoy's connections over them. They share
nothing: each loads the policies and workloads itself and reloads them on
its own. The supervisor holds no gRPC state (gRPC and fork do not mix), only
restarts a worker that dies and forwards SIGTERM for a graceful drain.
It also serves the pod's one admin endpoint, over every worker's metrics and
decisions (authz/observe/pooled.py).
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

from authz.observe.pooled import PodObservability

log = logging.getLogger("egress-authz")

RESTART_BACKOFF = 1.0

ArgvFor = Callable[[int, int, int], list[str]]  # (worker index, ready fd, record fd) -> argv


class _Pod:
    """The workers' processes and, per worker, the socket its decisions come in on."""

    def __init__(self, argv_for: ArgvFor, obs: PodObservability) -> None:
        self.argv_for = argv_for
        self.obs = obs
        self.channels: dict[int, object] = {}

    def spawn(self, index: int) -> tuple[subprocess.Popen[bytes], int]:
        read_fd, write_fd = os.pipe()
        fds = [write_fd]
        record_fd = -1
        if self.obs.collector is not None:
            mine, record_fd = self.obs.collector.channel()
            self.channels[index] = mine
            fds.append(record_fd)
        try:
            proc = subprocess.Popen(self.argv_for(index, write_fd, record_fd), pass_fds=fds)
        finally:
            for fd in fds:
                os.close(fd)
        return proc, read_fd

    def replaced(self, index: int, pid: int) -> None:
        self.obs.worker_gone(pid)
        mine = self.channels.pop(index, None)
        if mine is not None and self.obs.collector is not None:
            self.obs.collector.release(mine)  # type: ignore[arg-type]


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
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    obs = PodObservability()  # before any import of authz.observe.metrics here or in a worker
    try:
        return _supervise(args, argv_for, stop, obs)
    finally:
        obs.close()


def _supervise(args: argparse.Namespace, argv_for: ArgvFor, stop: threading.Event,
               obs: PodObservability) -> int:
    n = args.workers
    all_ready = threading.Event()
    if args.admin_address:
        try:
            admin = obs.start_admin(
                args.admin_address, args.decision_buffer, all_ready.is_set,
                args.admin_max_streams, args.admin_allowed_hosts,
            )
        except (OSError, ValueError) as e:
            print(
                f"egress-authz serve: cannot serve the admin endpoint on {args.admin_address}: "
                f"{getattr(e, 'strerror', None) or e}; free the port, or give another "
                "--admin-address ('' turns the endpoint off)",
                file=sys.stderr, flush=True,
            )
            return 1
        log.info("admin endpoint on %s (all %d workers)", admin.url, n)  # type: ignore[attr-defined]
    pod = _Pod(argv_for, obs)
    started = [pod.spawn(i) for i in range(n)]
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
    all_ready.set()
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
            pod.replaced(i, proc.pid)
            time.sleep(RESTART_BACKOFF)
            procs[i], fd = pod.spawn(i)
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
