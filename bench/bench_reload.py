"""Check latency while a large policy file is reloaded (file mode).

`egress-authz serve --policies DIR` with 30,000 rules in one 5 MB file
(300 ConfigMaps x 100 rules x 3 hosts). One client sends Checks back to back
(one in flight) the whole time; the file is rewritten and the Checks answered
between the write and the server's "policy revision 2 in force" line are the
reload's. Two servers, interleaved:

  in-process   the file parsed and validated in the serving process (as
               before authz/offload.py: forced with OFFLOAD_MIN_BYTES = inf)
  child        parsed and validated in a child process (the default for files
               of 512 KiB and more), compiled in the server with the
               collector paused (authz/store.py)

Both compile and publish the same way, so the difference is the parse.

    .venv/bin/python bench/run.py reload
    .venv/bin/python bench/bench_reload.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import yaml

from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest
from authz.envoy.server import CHECK_METHOD
from authz.testing.envoy import free_port

CONFIGMAPS, RULES, HOSTS = 300, 100, 3
IDLE_SECONDS = 3.0
WRAPPER = (
    "import sys, authz.offload as o; o.OFFLOAD_MIN_BYTES = {min_bytes}; "
    "from authz.cli import main; sys.exit(main(sys.argv[1:]))"
)
MODES = {"in-process": 1 << 62, "child": None}


def write_policies(directory: Path, generation: int) -> int:
    """The big file (rewritten per generation) and a small policy the Checks hit."""
    docs = []
    for c in range(CONFIGMAPS):
        rules = [
            {"name": f"r{r}", "workloads": {"serviceAccounts": [f"sa{r % 7}"]},
             "hosts": [f"h{r}-{k}-g{generation}.c{c}.example.com" for k in range(HOSTS)],
             "ports": [443]}
            for r in range(RULES)
        ]
        docs.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"p{c}", "namespace": f"ns{c}",
                         "labels": {"egress-authz.io/policy": "true"}},
            "data": {"policy.yaml": yaml.safe_dump({"rules": rules}, width=1000)},
        })
    big = directory / "big.yaml"
    tmp = directory / ".big.yaml.tmp"  # dot-named: never read half-written
    tmp.write_text(yaml.safe_dump_all(docs, width=10**9))
    tmp.replace(big)
    small = directory / "shop.yaml"
    if not small.exists():
        small.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "egress", "namespace": "shop",
                         "labels": {"egress-authz.io/policy": "true"}},
            "data": {"policy.yaml": "rules: [{name: cart, workloads: {serviceAccounts: [cart]},"
                                    " hosts: [api.kadath.io]}]\n"},
        }))
    return big.stat().st_size


def check_request() -> bytes:
    r = CheckRequest()
    a = r.attributes
    a.source.principal = "spiffe://cluster.local/ns/shop/sa/cart"
    a.source.address.socket_address.address = "10.0.0.1"
    a.destination.address.socket_address.port_value = 443
    a.tls_session.sni = "api.kadath.io"
    return r.SerializeToString()


class Server:
    def __init__(self, directory: Path, mode: str) -> None:
        self.port = free_port()
        min_bytes = MODES[mode]
        argv = [sys.executable, "-c", WRAPPER.format(min_bytes=min_bytes)] if min_bytes else [
            sys.executable, "-m", "authz"]
        self.proc = subprocess.Popen(
            [*argv, "serve", "--policies", str(directory), "--no-decision-log",
             "--grpc-address", f"127.0.0.1:{self.port}", "--admin-address", ""],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.revisions: dict[int, float] = {}
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            self.proc.kill()
            raise RuntimeError("server did not start")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("egress-authz: serving Check"):
                self.ready.set()
            if "in force" in line and "policy revision" in line:
                rev = int(line.split("policy revision", 1)[1].split()[0])
                self.revisions[rev] = time.monotonic()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_once(mode: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        size = write_policies(directory, 0)
        server = Server(directory, mode)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        call = channel.unary_unary(CHECK_METHOD)
        body = check_request()
        samples: list[tuple[float, float]] = []  # (sent at, seconds)
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                call(body, timeout=30)
                samples.append((sent, time.monotonic() - sent))

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        time.sleep(IDLE_SECONDS)
        written = time.monotonic()
        write_policies(directory, 1)
        deadline = written + 300
        while 2 not in server.revisions and time.monotonic() < deadline:
            time.sleep(0.05)
        done = server.revisions.get(2, deadline)
        time.sleep(0.2)
        stop.set()
        thread.join(35)
        channel.close()
        server.stop()
    idle = [s for t, s in samples if t < written]
    during = [s for t, s in samples if written <= t <= done]
    return {
        "mb": size / 1e6,
        "reload_s": done - written,
        "idle_p50_ms": _pct(idle, 50), "idle_p99_ms": _pct(idle, 99),
        "p50_ms": _pct(during, 50), "p99_ms": _pct(during, 99),
        "max_ms": max(during, default=0.0) * 1e3,
        "max_at_s": max(((s, t - written) for t, s in samples if written <= t <= done),
                        default=(0.0, 0.0))[1],
        "checks_per_s": len(during) / max(done - written, 1e-9),
        "idle_checks_per_s": len(idle) / IDLE_SECONDS,
    }


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * pct // 100)] * 1e3


def main(runs: int = 2) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for i in range(runs):
        for mode in MODES:  # interleaved: the shared machine's load hits both alike
            r = run_once(mode)
            results[mode].append(r)
            print(f"  run {i + 1}/{runs} {mode:>10}: reload {r['reload_s']:.1f} s, "
                  f"p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.0f} ms "
                  f"({r['max_at_s']:.1f} s after the write)", flush=True)
    medians = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for m, rs in results.items()}
    print(f"\n{CONFIGMAPS * RULES:,} rules, {medians['child']['mb']:.1f} MB, "
          f"medians of {runs} run(s); one client, one Check in flight\n")
    print("| parse | reload s | Checks/s idle → reloading | p50 ms idle → reloading "
          "| p99 ms idle → reloading | max ms |")
    print("|---|---|---|---|---|---|")
    for mode, m in medians.items():
        print(f"| {mode} | {m['reload_s']:.1f} | {m['idle_checks_per_s']:,.0f} → "
              f"{m['checks_per_s']:,.0f} | {m['idle_p50_ms']:.2f} → {m['p50_ms']:.2f} | "
              f"{m['idle_p99_ms']:.2f} → {m['p99_ms']:.2f} | {m['max_ms']:.0f} |")
    return {"medians": medians, "runs": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=2)
    main(parser.parse_args().runs)
