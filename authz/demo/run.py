"""`egress-authz demo`: bring the stack up, run the calls, show the verdicts,
the `traces` view and one `explain`, then shut down (or stay up).

Exit status (the CLI's table): 0 when every call got its expected verdict and
reason; 1 when one did not, or the stack could not start (no Envoy); 2 for a
--port-base out of range or taken, or policies that do not load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

from . import table
from .calls import Outcome, run_calls
from .policies import policy_sources
from .scenario import CALLS, EXPLAIN_CALL, HOSTS, PODS
from .stack import DemoError, DemoStack, Ports, ensure_envoy, ensure_pod_addresses

Say = Callable[[str], None]

EXIT_OK = 0
EXIT_MISMATCH = 1
STEPS = 5
LOOPBACK = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Options:
    keep_running: bool = False
    port_base: int | None = None
    workdir: Path | None = None  # default: a fresh temporary directory, removed after


class Interrupted(Exception):
    """SIGTERM (or SIGINT) arrived: unwind so that everything is stopped."""


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into an exception in the main thread, so that
    the `finally` blocks stop every process the demo started."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be handled there; a caller off it (a test) stops us itself
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(options: Options, out: TextIO = sys.stdout) -> int:
    sink = [out]

    def say(text: str) -> None:
        try:
            print(text, file=sink[0], flush=True)
        except BrokenPipeError:  # `egress-authz demo | head`: carry on quietly, still clean up
            sink[0] = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the run

    started = time.monotonic()
    _bypass_proxies()
    stack: DemoStack | None = None
    code: int | None = None
    with _signals_unwind():
        try:
            try:
                ensure_pod_addresses()
                ports = Ports.choose(options.port_base)
                ensure_envoy()
            except DemoError as e:
                say(f"egress-authz demo: {e}")
                return e.exit_code
            stack = DemoStack(ports, options.workdir)
            try:
                _start(stack, say)
            except DemoError as e:
                say(f"\negress-authz demo: could not start.\n{e}")
                return e.exit_code
            # From now on every policy reload (a live edit) is noted on the console.
            stack.reload_notes.say = say
            say(f"[4/{STEPS}] running {len(CALLS)} calls through the mesh")
            outcomes = run_calls(stack, CALLS)
            code = _report(stack, outcomes, say)
            say(f"\ndemo finished in {time.monotonic() - started:.1f}s")
            if options.keep_running:
                _print_try_it(stack, say, outcomes[EXPLAIN_CALL].decision_id)
                _wait_forever()
            return code
        except (Interrupted, KeyboardInterrupt):
            say("\ninterrupted: stopping everything the demo started")
            # After the table, Ctrl-C is how --keep-running ends: the verdicts decide.
            return code if code is not None else 130
        finally:
            if stack is not None:
                _ignore_interrupts()  # a second Ctrl-C must not cut the clean-up short
                stack.stop()
                stack.remove_files()


def _bypass_proxies() -> None:
    """Everything the demo talks to is on loopback. With http_proxy set (common
    on company laptops) urllib and gRPC would send even 127.0.0.1 requests to
    the proxy: the Envoy readiness probes, the admin API, `traces`."""
    for key in ("no_proxy", "NO_PROXY"):
        current = [h for h in os.environ.get(key, "").split(",") if h]
        os.environ[key] = ",".join([*current, *(h for h in LOOPBACK if h not in current)])


def _ignore_interrupts() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)


def _start(stack: DemoStack, say: Say) -> None:
    say(f"[1/{STEPS}] writing certificates, policies and Pod manifests to {stack.workdir}")
    stack.write_files()
    say("      policies: " + ", ".join(str(f) for f in policy_sources()))
    for pod in PODS:
        labels = ", ".join(f"{k}={v}" for k, v in pod.labels.items())
        say(f"      pod {pod.workload:<20} {pod.ip:<10} {labels}")
    say(f"[2/{STEPS}] starting HTTPS stand-ins for {', '.join(HOSTS)} on 127.0.0.1")
    stack.start_hosts()
    say(f"[3/{STEPS}] starting egress-authz serve, the gateway Envoy and {len(PODS)} sidecars")
    begun = time.monotonic()
    stack.start_service_and_envoys(
        lambda name: say(f"      ready: {name} ({time.monotonic() - begun:.1f}s)")
    )
    p = stack.ports
    say(
        f"      gateway mTLS listeners 127.0.0.1:{p.gateway_tls} (TLS, stands for 443) and "
        f":{p.gateway_http} (HTTP, for 80); Check 127.0.0.1:{p.authz}; admin {stack.admin_url}"
    )


def _report(stack: DemoStack, outcomes: Sequence[Outcome], say: Say) -> int:
    say("")
    say(table.render(outcomes))
    say("")
    say(table.legend())
    failed = [o for o in outcomes if not o.as_expected]
    say("")
    if failed:
        say(f"{len(failed)} of {len(outcomes)} calls did NOT get the expected verdict")
    else:
        say(f"{len(outcomes)}/{len(outcomes)} calls got the expected verdict; the stand-in hosts "
            "saw connections only from the calls let through")
    say("")
    say(f"[5/{STEPS}] the same decisions as the service recorded them (`traces`), and why "
        "one was denied (`explain`)")
    say("")
    _run_cli(say, ["traces", "--server", stack.admin_url, "--limit", str(len(outcomes))])
    explained = outcomes[EXPLAIN_CALL].decision_id
    if explained:
        say("")
        _run_cli(say, ["explain", "--server", stack.admin_url, explained])
    return EXIT_OK if not failed and explained else EXIT_MISMATCH


def _run_cli(say: Say, args: list[str]) -> int:
    """The real CLI in its own process, as a user would run it."""
    say("$ egress-authz " + " ".join(args))
    done = subprocess.run(
        [sys.executable, "-m", "authz", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    text = (done.stdout + done.stderr).rstrip()
    if text:
        say(text)
    return done.returncode


def _print_try_it(stack: DemoStack, say: Say, decision_id: str | None) -> None:
    from .tryit import instructions

    say("")
    say(instructions(stack, decision_id))


def _wait_forever() -> None:
    event = threading.Event()
    while not event.wait(3600):
        pass
