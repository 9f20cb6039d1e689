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
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nraw figures: {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
