"""Check throughput, latency and CPU straight at the gRPC port, with h2load.

Replays one CheckRequest recorded from a real Envoy 1.40 (the HTTP
ext_authz filter, principal spiffe://cluster.local/ns/shop/sa/cart, Host
api.kadath.io, an allowed request) against:

  floor        authz.testing.floor: threaded grpcio answering a constant,
               pre-encoded OK, the Python gRPC floor any ext_authz server in
               Python stands on
  floor-aio    the same on grpc.aio (one event loop): the other flavour;
               each figure is compared with the better of the two floors
  release/10   (with --baseline REV) egress-authz serve from git revision REV,
               10 hosts: the release the new code must not be slower than
  service/10   egress-authz serve, 10 hosts in the policy
  service/100k egress-authz serve, 100,000 hosts over 1,000 namespaces
               (a quarter wildcards)
  service/10 --workers 2
  service/10 aio the same on `--server-model aio` (one grpc.aio event loop):
               the other serving model, in the same rounds

For each: checks/s at saturation (h2load -c 8 -m 4), p50/p99, CPU µs per
check (utime+stime of the server's process tree from /proc), and p50/p99 at
a fixed 1,000 checks/s (h2load -c 4 --rps 250). Runs are interleaved across
servers and repeated; the table shows medians. h2load shares the 2 cores
with the server, as Envoy would in a pod.

    .venv/bin/python bench/run.py service            # BENCH_BASELINE=REV adds release/10
    .venv/bin/python bench/bench_service.py --runs 3 [--quick] [--baseline REV]
    .venv/bin/python bench/bench_service.py --only release/10,service/10 --baseline REV
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from authz.testing.envoy import free_port
from authz.testing.floor import CHECK_METHOD, FloorProcess, FloorServer
from authz.testing.loadgen import (
    H2LoadResult,
    cpu_seconds,
    grpc_frame,
    median,
    run_h2load,
)
from authz.testing.mesh import LoopbackMesh
from authz.testing.service import ServiceProcess

POD_IP = "127.0.0.2"
HOST = "api.kadath.io"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SIZES = {"10": 10, "100k": 100_000}
N_NAMESPACES = 1_000
HOSTS_PER_RULE = 5
ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("floor", "floor-aio")
# h2load: saturation with 8 connections x 4 streams; the fixed rate is 4 x 250/s.
SAT_CLIENTS, SAT_STREAMS = 8, 4
FIXED_CLIENTS, FIXED_RPS_PER_CLIENT = 4, 250


def export_revision(rev: str, into: Path) -> Path:
    """`authz/` as of git revision `rev`, unpacked under `into` (run it with
    PYTHONPATH=into and this venv): the release baseline of the same run."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "authz"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


# ---------------------------------------------------------------- fixtures


def record_check_request(workdir: Path) -> tuple[bytes, int]:
    """One CheckRequest as Envoy sends it for cart -> api.kadath.io over HTTP,
    and the gateway listener port it names (the policy must allow it)."""
    with FloorServer(record=True) as probe, LoopbackMesh(probe.port, workdir=workdir) as mesh:
        result = mesh.http(
            HOST,
            namespace="shop",
            service_account="cart",
            source_ip=POD_IP,
            path="/v1/charges",
            method="POST",
            headers={"traceparent": TRACEPARENT, "user-agent": "bench"},
        )
        if result.status != 200 or len(probe.requests) != 1:
            raise RuntimeError(f"recording failed: {result.status}, {len(probe.requests)} checks")
        return probe.requests[0], mesh.http_port


def configmap(namespace: str, rules: list[tuple[str, list[str], str]], ports: str) -> str:
    lines = [
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: egress-policy",
        f"  namespace: {namespace}",
        '  labels: {egress-authz.io/policy: "true"}',
        "data:",
        "  policy.yaml: |",
        "    rules:",
    ]
    for name, hosts, sa in rules:
        lines += [
            f"      - name: {name}",
            f"        workloads: {{serviceAccounts: [{sa}]}}",
            f"        hosts: [{', '.join(hosts)}]",
            f"        ports: {ports}",
        ]
    return "\n".join(lines) + "\n"


def write_policies(directory: Path, n_hosts: int, port: int) -> None:
    """`n_hosts` hosts in all: the one the replayed request asks for, in shop,
    and the rest spread over up to 1,000 namespaces, every fourth a wildcard."""
    directory.mkdir(parents=True, exist_ok=True)
    ports = f"[443, {port}]"
    docs = [configmap("shop", [("cart-kadath", [HOST], "cart")], ports)]
    rest = n_hosts - 1
    n_ns = max(1, min(N_NAMESPACES, rest))
    per_ns: dict[int, list[str]] = {i: [] for i in range(n_ns)}
    for i in range(rest):
        host = f"'*.svc{i}.example.com'" if i % 4 == 3 else f"host{i}.example.com"
        per_ns[i % n_ns].append(host)
    for i, hosts in per_ns.items():
        rules = [
            (f"r{j}", hosts[k : k + HOSTS_PER_RULE], "app")
            for j, k in enumerate(range(0, len(hosts), HOSTS_PER_RULE))
        ]
        if rules:
            docs.append(configmap(f"ns{i}", rules, ports))
    (directory / "policies.yaml").write_text("---\n".join(docs))


def write_pods(path: Path) -> None:
    path.write_text(
        f"""\
apiVersion: v1
kind: Pod
metadata: {{name: cart-0, namespace: shop, labels: {{app: cart}}}}
spec: {{serviceAccountName: cart}}
status: {{phase: Running, podIP: {POD_IP}}}
"""
    )


def check_once(port: int, request: bytes) -> int:
    """The gRPC status code inside the CheckResponse (0 = allowed)."""
    from envoy_data_plane.envoy.service.auth.v3 import CheckResponse

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(CHECK_METHOD)
        raw = call(request, timeout=5)
    response = CheckResponse.parse(raw)
    return response.status.code if response.status else 0


# ------------------------------------------------------------------ running


class Server:
    def __init__(self, name: str, port: int, pid: Callable[[], int]) -> None:
        self.name = name
        self.port = port
        self.pid = pid
        self.saturated: list[tuple[H2LoadResult, float]] = []  # (result, cpu µs/check)
        self.fixed: list[tuple[H2LoadResult, float]] = []


def pid_of(process: FloorProcess | ServiceProcess) -> Callable[[], int]:
    """The pid now (a restarted process has a new one)."""
    return lambda: process.pid


def measure(server: Server, body: Path, requests: int, rps_per_client: int | None) -> None:
    url = f"http://127.0.0.1:{server.port}{CHECK_METHOD}"
    before = cpu_seconds(server.pid())
    if rps_per_client is None:
        result = run_h2load(
            url, body, requests=requests, clients=SAT_CLIENTS, streams=SAT_STREAMS
        )
    else:
        result = run_h2load(
            url, body, requests=requests, clients=FIXED_CLIENTS, streams=1,
            rps_per_client=rps_per_client,
        )
    cpu_us = (cpu_seconds(server.pid()) - before) * 1e6 / max(1, result.succeeded)
    if result.failed or result.succeeded != requests:
        raise RuntimeError(f"{server.name}: {result.failed} failed of {requests}")
    (server.saturated if rps_per_client is None else server.fixed).append((result, cpu_us))


def main(
    runs: int | None = None, quick: bool = False, baseline: str | None = None,
    only: set[str] | None = None,
) -> dict[str, Any]:
    """`only`: measure just these servers besides the two floors (A/B runs)."""
    runs = runs or int(os.environ.get("BENCH_RUNS", "3"))
    quick = quick or os.environ.get("BENCH_QUICK") == "1"
    baseline = baseline or os.environ.get("BENCH_BASELINE") or None
    saturate_n = 4_000 if quick else 20_000
    fixed_seconds = 2 if quick else 8
    sizes = {"10": 10, "100k": 10_000 if quick else 100_000}

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        work = Path(tmp)
        request, port = record_check_request(work / "record")
        body = work / "check.grpc"
        body.write_bytes(grpc_frame(request))
        pods = work / "pods.yaml"
        write_pods(pods)

        floors = {
            "floor": FloorProcess(free_port()),
            "floor-aio": FloorProcess(free_port(), aio=True),
        }
        services: dict[str, ServiceProcess] = {}
        servers = [Server(name, f.port, pid_of(f)) for name, f in floors.items()]
        try:
            for f in floors.values():
                f.start()
            # (label, hosts, extra flags, build): one process each, all on the same
            # machine at once, measured in turn.
            variants: list[tuple[str, int, tuple[str, ...], Path | None]] = []
            if baseline:
                release = export_revision(baseline, work / "release")
                variants.append(("release/10", sizes["10"], (), release))
            variants += [(f"service/{label}", n, (), None) for label, n in sizes.items()]
            variants.append(("service/10 --workers 2", sizes["10"], ("--workers", "2"), None))
            # The other serving model, measured in the same rounds (issue 14).
            aio = ("--server-model", "aio")
            variants.append(("service/10 aio", sizes["10"], aio, None))
            if only:
                variants = [v for v in variants if v[0] in only]
            for label, n, flags, build in variants:
                policies = work / f"policies-{n}"
                if not policies.exists():
                    write_policies(policies, n, port)
                svc = ServiceProcess(
                    policies,
                    free_port(),
                    workloads=pods,
                    admin_port=free_port(),
                    extra_args=flags,
                    log_path=work / f"service-{len(services)}.log",
                    start_timeout=300,
                    env={"PYTHONPATH": str(build)} if build else None,
                    cwd=build,
                )
                started = time.monotonic()
                svc.start()
                print(
                    f"{label}: {n} hosts loaded in {time.monotonic() - started:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
                services[label] = svc
                servers.append(Server(label, svc.port, pid_of(svc)))
            for s in servers:
                code = check_once(s.port, request)
                if code != 0:
                    raise RuntimeError(
                        f"{s.name} does not allow the replayed request (code {code})"
                    )
                measure(s, body, 2_000, None)  # warm-up, discarded
                s.saturated.clear()
            for _ in range(runs):
                for s in servers:
                    measure(s, body, saturate_n, None)
                    measure(s, body, 1_000 * fixed_seconds, FIXED_RPS_PER_CLIENT)
        finally:
            for svc in services.values():
                svc.stop()
            for f in floors.values():
                f.stop()

    load = (load_before, os.getloadavg()[0])
    return report(servers, runs, sizes, saturate_n, fixed_seconds, len(request), load, baseline)


def report(
    servers: list[Server],
    runs: int,
    sizes: dict[str, int],
    saturate_n: int,
    fixed_seconds: int,
    request_bytes: int,
    load: tuple[float, float],
    baseline: str | None = None,
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for s in servers:
        figures[s.name] = {
            "checks_per_s": median([r.rps for r, _ in s.saturated]),
            "p50_ms": median([r.p50_ms for r, _ in s.saturated]),
            "p99_ms": median([r.p99_ms for r, _ in s.saturated]),
            "cpu_us_per_check": median([c for _, c in s.saturated]),
            "fixed_1000_p50_ms": median([r.p50_ms for r, _ in s.fixed]),
            "fixed_1000_p99_ms": median([r.p99_ms for r, _ in s.fixed]),
            "fixed_1000_cpu_us_per_check": median([c for _, c in s.fixed]),
            "runs_checks_per_s": [round(r.rps) for r, _ in s.saturated],
            "runs_cpu_us_per_check": [round(c) for _, c in s.saturated],
            "runs_fixed_1000_p99_ms": [round(r.p99_ms, 2) for r, _ in s.fixed],
        }
    small, large = figures.get("service/10"), figures.get("service/100k")
    workers = figures.get("service/10 --workers 2")
    floors = [figures[name] for name in FLOORS]
    # Each figure against the better floor for it.
    best_rate = max(f["checks_per_s"] for f in floors)
    best_cpu = min(f["cpu_us_per_check"] for f in floors)
    best_p99 = min(f["fixed_1000_p99_ms"] for f in floors)
    ratios: dict[str, float] = {}
    if small is not None:
        ratios |= {
            "service10_vs_best_floor_checks_per_s": small["checks_per_s"] / best_rate,
            "service10_vs_best_floor_cpu_per_check": small["cpu_us_per_check"] / best_cpu,
            "service10_vs_best_floor_fixed_p99": small["fixed_1000_p99_ms"] / best_p99,
        }
    if small is not None and large is not None:
        ratios |= {
            "service100k_vs_service10_checks_per_s": large["checks_per_s"]
            / small["checks_per_s"],
            "service100k_vs_service10_fixed_p99": large["fixed_1000_p99_ms"]
            / small["fixed_1000_p99_ms"],
        }
    if small is not None and workers is not None:
        ratios["workers2_vs_service10_checks_per_s"] = (
            workers["checks_per_s"] / small["checks_per_s"]
        )
    if small is not None and "release/10" in figures:
        release = figures["release/10"]
        ratios["service10_vs_release10_checks_per_s"] = (
            small["checks_per_s"] / release["checks_per_s"]
        )
        ratios["service10_vs_release10_cpu_per_check"] = (
            small["cpu_us_per_check"] / release["cpu_us_per_check"]
        )
        ratios["service10_vs_release10_fixed_p99"] = (
            small["fixed_1000_p99_ms"] / release["fixed_1000_p99_ms"]
        )
    if small is not None and "service/10 aio" in figures:
        other = figures["service/10 aio"]
        ratios["service10_aio_vs_service10_checks_per_s"] = (
            other["checks_per_s"] / small["checks_per_s"]
        )
        ratios["service10_aio_vs_service10_cpu_per_check"] = (
            other["cpu_us_per_check"] / small["cpu_us_per_check"]
        )
        ratios["service10_aio_vs_service10_fixed_p99"] = (
            other["fixed_1000_p99_ms"] / small["fixed_1000_p99_ms"]
        )
    figures["ratios"] = ratios
    figures["meta"] = {
        "runs": runs,
        "hosts": sizes,
        "saturation_requests": saturate_n,
        "fixed_rate_seconds": fixed_seconds,
        "request_bytes": request_bytes,
        "baseline": baseline,
        "loadavg_1min_before_after": load,
        "cpus": os.cpu_count(),
        "commands": {
            "saturation": servers[0].saturated[0][0].command,
            "fixed_rate": servers[0].fixed[0][0].command,
        },
    }

    print(
        f"\nCheck over gRPC, h2load, median of {runs} interleaved runs "
        f"({request_bytes}-byte recorded CheckRequest):\n"
    )
    print(
        "| server | checks/s | p50 ms | p99 ms | CPU µs/check | p50 ms @1000/s "
        "| p99 ms @1000/s | CPU µs/check @1000/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in servers:
        f = figures[s.name]
        print(
            f"| {s.name} | {f['checks_per_s']:,.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} "
            f"| {f['cpu_us_per_check']:.0f} | {f['fixed_1000_p50_ms']:.2f} "
            f"| {f['fixed_1000_p99_ms']:.2f} | {f['fixed_1000_cpu_us_per_check']:.0f} |"
        )
    rows = [
        ("service/10 ÷ faster floor, checks/s", "service10_vs_best_floor_checks_per_s", "≥ 0.8"),
        ("service/10 ÷ cheaper floor, CPU per check", "service10_vs_best_floor_cpu_per_check",
         "≤ 1.25"),
        ("service/10 ÷ lower floor, p99 @1000/s", "service10_vs_best_floor_fixed_p99", "≤ 1.25"),
        ("service/10 ÷ release/10, checks/s", "service10_vs_release10_checks_per_s", ""),
        ("service/10 ÷ release/10, CPU per check", "service10_vs_release10_cpu_per_check", ""),
        ("service/10 ÷ release/10, p99 @1000/s", "service10_vs_release10_fixed_p99", "≤ 1"),
        ("service/10 --workers 2 ÷ service/10, checks/s", "workers2_vs_service10_checks_per_s",
         "≥ 1.6"),
        ("service/10 aio ÷ service/10 (threads), checks/s",
         "service10_aio_vs_service10_checks_per_s", ""),
        ("service/10 aio ÷ service/10 (threads), CPU per check",
         "service10_aio_vs_service10_cpu_per_check", ""),
        ("service/10 aio ÷ service/10 (threads), p99 @1000/s",
         "service10_aio_vs_service10_fixed_p99", ""),
        ("service/100k ÷ service/10, checks/s", "service100k_vs_service10_checks_per_s", "≥ 0.95"),
        ("service/100k ÷ service/10, p99 @1000/s", "service100k_vs_service10_fixed_p99", ""),
    ]
    print()
    print("| ratio | value | goal |")
    print("|---|---:|---|")
    for label, key, goal in rows:
        if key in ratios:
            print(f"| {label} | {ratios[key]:.2f} | {goal} |")
    print()
    for name, cmd in figures["meta"]["commands"].items():
        print(f"{name}: `{cmd}`")
    if baseline:
        print(f"release/10: `egress-authz serve` from `git archive {baseline} authz`")
    print(f"1-min load average before/after: {load[0]:.2f}/{load[1]:.2f} on {os.cpu_count()} CPUs")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer requests, 10k not 100k hosts")
    parser.add_argument(
        "--baseline", metavar="REV", help="also measure `serve` from this git revision"
    )
    parser.add_argument(
        "--only", metavar="NAMES",
        help="comma-separated servers to measure besides the floors, e.g. release/10,service/10",
    )
    args = parser.parse_args()
    main(args.runs, args.quick, args.baseline, set(args.only.split(",")) if args.only else None)
