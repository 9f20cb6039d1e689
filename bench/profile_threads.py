"""CPU per Check of each thread of a server under h2load: where the µs go.

Starts `egress-authz serve` (the replayed request, 10 hosts, as
bench_service.py) or a floor, warms it up, then reads every thread's
utime+stime and voluntary context switches from /proc/PID/task before and
after N Checks of h2load -c 8 -m 4, and prints them per Check.

    .venv/bin/python bench/profile_threads.py serve [-- serve flags...]
    .venv/bin/python bench/profile_threads.py floor|floor-aio
    .venv/bin/python bench/profile_threads.py serve --checks 20000 -- --server-model aio
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from authz.testing.envoy import free_port
from authz.testing.floor import CHECK_METHOD, FloorProcess
from authz.testing.loadgen import grpc_frame, run_h2load
from authz.testing.service import ServiceProcess

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_service  # the replayed request and its policy


def task_stats(pid: int) -> dict[str, tuple[str, float, int]]:
    """thread id -> (name, CPU seconds, voluntary context switches)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:
            continue  # exited meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        switches = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / tick, switches)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=("serve", "floor", "floor-aio"))
    parser.add_argument("--checks", type=int, default=20_000)
    args, flags = parser.parse_known_args()  # after --: flags for serve
    args.flags = [f for f in flags if f != "--"]
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        work = Path(tmp)
        request, port = bench_service.record_check_request(work / "record")
        body = work / "check.grpc"
        body.write_bytes(grpc_frame(request))
        server: ServiceProcess | FloorProcess
        if args.server == "serve":
            bench_service.write_policies(work / "policies", 10, port)
            bench_service.write_pods(work / "pods.yaml")
            server = ServiceProcess(work / "policies", free_port(), workloads=work / "pods.yaml",
                                    admin_port=free_port(), extra_args=args.flags)
        else:
            server = FloorProcess(free_port(), aio=args.server == "floor-aio")
        server.start()
        try:
            url = f"http://127.0.0.1:{server.port}{CHECK_METHOD}"
            run_h2load(url, body, requests=2_000, clients=8, streams=4)  # warm-up
            before = task_stats(server.pid)
            result = run_h2load(url, body, requests=args.checks, clients=8, streams=4)
            after = task_stats(server.pid)
        finally:
            server.stop()
    n = args.checks
    print(f"{args.server} {' '.join(args.flags)}: {result.rps:,.0f} checks/s")
    print("| thread | CPU µs per Check | voluntary switches per Check |")
    print("|---|---:|---:|")
    total = 0.0
    for tid, (name, cpu, switches) in sorted(after.items(), key=lambda kv: -kv[1][1]):
        _, cpu0, sw0 = before.get(tid, (name, 0.0, 0))
        us = (cpu - cpu0) * 1e6 / n
        total += us
        if us >= 0.5:
            print(f"| {name} ({tid}) | {us:.1f} | {(switches - sw0) / n:.2f} |")
    print(f"| all threads | {total:.1f} | |")


if __name__ == "__main__":
    main()
