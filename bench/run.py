"""`make bench`: run every benchmark script (or those named) and print their tables.

Each bench/bench_<name>.py exposes `main() -> dict` and prints a Markdown
table of its own. Figures are ratios against baselines measured in the same
run; record them in docs/benchmarks.md with this command.

    make bench                         # everything
    make bench BENCH_ARGS="engine"     # only bench_engine.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    wanted = set(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    if wanted:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
        missing = wanted - {s.stem.removeprefix("bench_") for s in scripts}
        if missing:
            print(f"no such benchmark: {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
    results = {}
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        print(f"\n## {name}  ({script.relative_to(HERE.parent)})", flush=True)
        spec = importlib.util.spec_from_file_location(f"bench_{name}", script)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        started = time.monotonic()
        results[name] = module.main()
        print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
    print_targets(results)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nraw figures: {out / 'latest.json'}")
    return 0


# Issue 14's targets: (label, benchmark, ratio key, goal: at least / at most this).
TARGETS = [
    ("checks/s ÷ faster floor", "service", "service10_vs_best_floor_checks_per_s", "≥", 0.8),
    ("CPU per check ÷ cheaper floor", "service", "service10_vs_best_floor_cpu_per_check",
     "≤", 1.25),
    ("p99 @1000/s ÷ lower floor", "service", "service10_vs_best_floor_fixed_p99", "≤", 1.25),
    ("p99 @1000/s ÷ release, same run", "service", "service10_vs_release10_fixed_p99", "≤", 1),
    ("--workers 2 ÷ one process, checks/s", "service", "workers2_vs_service10_checks_per_s",
     "≥", 1.6),
    ("through Envoy: ours ÷ faster floor", "envoy", "service_vs_floor", "≥", 0.9),
    ("100,000 ÷ 10 hosts, checks/s", "service", "service100k_vs_service10_checks_per_s",
     "≥", 0.95),
]


def print_targets(results: dict[str, Any]) -> None:
    """The issue-14 targets table, from whichever of service/envoy ran."""
    rows = []
    for label, bench, key, op, bound in TARGETS:
        value = (results.get(bench) or {}).get("ratios", {}).get(key)
        if value is not None:
            met = value >= bound if op == "≥" else value <= bound
            rows.append(f"| {label} | {value:.2f} | {op} {bound:g} | {'yes' if met else 'no'} |")
    if rows:
        print("\n## targets (issue 14)\n\n| target | value | goal | met? |\n|---|---:|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
