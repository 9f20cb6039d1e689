"""Requests/s through a real Envoy gateway, with and without ext_authz, with wrk.

    wrk ─HTTP─▶ sidecar Envoy ─mTLS (cart's SPIFFE cert)─▶ gateway Envoy ─▶ 200
                                                             │ ext_authz
                                                             ▼
                                            egress-authz serve | floor | none

wrk cannot present a client certificate, and without one there is no
principal and every check is a denial, so wrk speaks plain HTTP to a
sidecar Envoy (istio/envoy/sidecar-http.yaml) that adds the workload's mTLS,
exactly as in a mesh. The gateway (istio/envoy/bench-gateway.yaml) has four
listeners that differ only in ext_authz: none, our service (`serve` with
its default serving model), our service on the other model (`--server-model`,
the A/B behind the default), and the always-OK floor server in its threaded
and its asyncio flavour (our service is compared with the faster of the
two). Each answers 200 itself, so no upstream server limits the figures.
The arms run interleaved in the same run; the table shows medians and the
ratios between them.

    .venv/bin/python bench/run.py envoy
    .venv/bin/python bench/bench_envoy.py --runs 3 [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from authz.testing.envoy import Envoy, free_port
from authz.testing.floor import FloorProcess
from authz.testing.loadgen import WrkResult, cpu_seconds, median, run_wrk
from authz.testing.mesh import GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT
from authz.testing.pki import TestCA
from authz.testing.service import ServiceProcess

POD_IP = "127.0.0.2"
HOST = "api.kadath.io"
ARMS = ("none", "service", "service-other", "floor", "floor-aio")
MODELS = ("threads", "aio")


def default_model() -> str:
    """`serve`'s default --server-model (what users run)."""
    from authz.commands.serve import build_arg_parser

    return str(build_arg_parser().get_default("server_model"))


def write_world(work: Path, checked_ports: list[int]) -> tuple[Path, Path]:
    policies = work / "policies"
    policies.mkdir()
    (policies / "shop.yaml").write_text(
        f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: egress-policy
  namespace: shop
  labels: {{egress-authz.io/policy: "true"}}
data:
  policy.yaml: |
    rules:
      - name: cart-kadath
        workloads: {{serviceAccounts: [cart]}}
        hosts: [{HOST}]
        ports: [80, {", ".join(map(str, checked_ports))}]
"""
    )
    pods = work / "pods.yaml"
    pods.write_text(
        f"""\
apiVersion: v1
kind: Pod
metadata: {{name: cart-0, namespace: shop, labels: {{app: cart}}}}
spec: {{serviceAccountName: cart}}
status: {{phase: Running, podIP: {POD_IP}}}
"""
    )
    return policies, pods


def get(url: str) -> int:
    req = urllib.request.Request(url, headers={"Host": HOST})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def main(runs: int | None = None, quick: bool = False) -> dict[str, Any]:
    runs = runs or int(os.environ.get("BENCH_RUNS", "3"))
    quick = quick or os.environ.get("BENCH_QUICK") == "1"
    seconds = 2 if quick else 5
    connections = 16

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-envoy-") as tmp:
        work = Path(tmp)
        ca = TestCA(work / "pki")
        gateway_id = ca.workload(GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)
        cart = ca.workload("shop", "cart")
        ports = {arm: free_port() for arm in ARMS}
        policies, pods = write_world(work, [ports["service"], ports["service-other"]])
        model = default_model()
        other_model = next(m for m in MODELS if m != model)
        services = {
            arm: ServiceProcess(
                policies,
                free_port(),
                workloads=pods,
                admin_port=free_port(),
                log_path=work / f"{arm}.log",
                extra_args=[*os.environ.get("BENCH_ENVOY_SERVICE_ARGS", "").split(),
                            *(["--server-model", other_model] if arm == "service-other" else [])],
            )
            for arm in ("service", "service-other")
        }
        service = services["service"]
        floor = FloorProcess(free_port())
        floor_aio = FloorProcess(free_port(), aio=True)
        gateway = Envoy(
            "bench-gateway.yaml",
            {
                "PLAIN_PORT": ports["none"],
                "CHECKED_PORT": ports["service"],
                "FLOOR_PORT": ports["floor"],
                "AUTHZ_PORT": service.port,
                "OTHER_PORT": ports["service-other"],
                "OTHER_AUTHZ_PORT": services["service-other"].port,
                "FLOOR_AUTHZ_PORT": floor.port,
                "FLOOR_AIO_PORT": ports["floor-aio"],
                "FLOOR_AIO_AUTHZ_PORT": floor_aio.port,
                "GATEWAY_CERT": gateway_id.cert_path,
                "GATEWAY_KEY": gateway_id.key_path,
                "CA_CERT": ca.ca_path,
            },
            name="gateway",
            workdir=work,
            log_level="warning",
        )
        sidecars = {
            arm: Envoy(
                "sidecar-http.yaml",
                {
                    "LISTEN_PORT": free_port(),
                    "GATEWAY_HTTP_PORT": ports[arm],
                    "POD_IP": POD_IP,
                    "WORKLOAD_CERT": cart.cert_path,
                    "WORKLOAD_KEY": cart.key_path,
                    "CA_CERT": ca.ca_path,
                    "GATEWAY_SAN": gateway_id.uri,
                },
                name=f"sidecar-{arm}",
                workdir=work,
                log_level="warning",
            )
            for arm in ARMS
        }
        results: dict[str, list[tuple[WrkResult, float | None]]] = {arm: [] for arm in ARMS}
        try:
            for s in services.values():
                s.start()
            floor.start()
            floor_aio.start()
            gateway.start()
            for sidecar in sidecars.values():
                sidecar.start()
            urls = {arm: f"http://127.0.0.1:{sidecars[arm].values['LISTEN_PORT']}/" for arm in ARMS}
            for arm in ARMS:  # every arm must be answering 200 before it is timed
                status = get(urls[arm])
                if status != 200:
                    raise RuntimeError(f"{arm}: GET through the sidecar answered {status}")
            checked_before = gateway.stats("http.gateway_authz.ext_authz.ok").get(
                "http.gateway_authz.ext_authz.ok", 0
            )
            pids = {
                "service": lambda: service.pid,
                "service-other": lambda: services["service-other"].pid,
                "floor": lambda: floor.pid,
                "floor-aio": lambda: floor_aio.pid,
            }
            for arm in ARMS:  # warm-up, discarded
                run_wrk(urls[arm], seconds=1, connections=connections, headers=(f"Host: {HOST}",))
            for _ in range(runs):
                for arm in ARMS:
                    before = cpu_seconds(pids[arm]()) if arm in pids else None
                    result = run_wrk(
                        urls[arm],
                        seconds=seconds,
                        connections=connections,
                        headers=(f"Host: {HOST}",),
                    )
                    cpu_us = None
                    if before is not None:
                        cpu_us = (cpu_seconds(pids[arm]()) - before) * 1e6 / max(1, result.requests)
                    if result.non_2xx or result.socket_errors:
                        raise RuntimeError(
                            f"{arm}: {result.non_2xx} non-2xx, {result.socket_errors} socket errors"
                        )
                    results[arm].append((result, cpu_us))
            checked = (
                gateway.stats("http.gateway_authz.ext_authz.ok").get(
                    "http.gateway_authz.ext_authz.ok", 0
                )
                - checked_before
            )
        finally:
            for sidecar in sidecars.values():
                sidecar.stop()
            gateway.stop()
            floor.stop()
            floor_aio.stop()
            for s in services.values():
                s.stop()

    load = (load_before, os.getloadavg()[0])
    return report(results, runs, seconds, connections, checked, load, (model, other_model))


def report(
    results: dict[str, list[tuple[WrkResult, float | None]]],
    runs: int,
    seconds: int,
    connections: int,
    checked: int,
    load: tuple[float, float],
    models: tuple[str, str] = ("threads", "aio"),
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for arm, rs in results.items():
        cpus = [c for _, c in rs if c is not None]
        figures[arm] = {
            "rps": median([r.rps for r, _ in rs]),
            "p50_ms": median([r.p50_ms for r, _ in rs]),
            "p99_ms": median([r.p99_ms for r, _ in rs]),
            "authz_cpu_us_per_request": median(cpus) if cpus else None,
            "runs_rps": [round(r.rps) for r, _ in rs],
        }
    best_floor = max(figures["floor"]["rps"], figures["floor-aio"]["rps"])
    figures["ratios"] = {
        "service_vs_none": figures["service"]["rps"] / figures["none"]["rps"],
        "service_vs_floor": figures["service"]["rps"] / best_floor,
        "service_other_vs_floor": figures["service-other"]["rps"] / best_floor,
        "service_other_vs_service": figures["service-other"]["rps"] / figures["service"]["rps"],
        "floor_vs_none": best_floor / figures["none"]["rps"],
    }
    command = results["none"][0][0].command
    figures["meta"] = {
        "runs": runs,
        "seconds": seconds,
        "connections": connections,
        "service_checks_answered_ok": checked,
        "loadavg_1min_before_after": load,
        "cpus": os.cpu_count(),
        "command": command,
        "models": {"service": models[0], "service-other": models[1]},
    }
    labels = {
        "none": "Envoy, no ext_authz",
        "service": f"Envoy + egress-authz (`--server-model {models[0]}`, the default)",
        "service-other": f"Envoy + egress-authz (`--server-model {models[1]}`)",
        "floor": "Envoy + grpcio floor (threads)",
        "floor-aio": "Envoy + grpcio floor (aio)",
    }
    print(
        f"\nHTTP through sidecar + gateway Envoy, wrk, median of {runs} interleaved runs "
        f"of {seconds}s, {connections} connections:\n"
    )
    print("| gateway | req/s | p50 ms | p99 ms | ext_authz server CPU µs/request |")
    print("|---|---:|---:|---:|---:|")
    for arm in ARMS:
        f = figures[arm]
        cpu = f"{f['authz_cpu_us_per_request']:.0f}" if f["authz_cpu_us_per_request"] else "-"
        print(
            f"| {labels[arm]} | {f['rps']:,.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | {cpu} |"
        )
    r = figures["ratios"]
    print()
    print(
        f"egress-authz ÷ no ext_authz: {r['service_vs_none']:.2f}; "
        f"egress-authz ÷ faster floor: {r['service_vs_floor']:.2f} "
        f"({models[1]}: {r['service_other_vs_floor']:.2f}); "
        f"faster floor ÷ no ext_authz: {r['floor_vs_none']:.2f}"
    )
    print(f"(the gateway counted {checked:,} Checks answered OK by egress-authz)")
    print(f"command: `{command}`")
    print(f"1-min load average before/after: {load[0]:.2f}/{load[1]:.2f} on {os.cpu_count()} CPUs")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 s per run instead of 5 s")
    args = parser.parse_args()
    main(args.runs, args.quick)
