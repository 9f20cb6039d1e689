"""`egress-authz`: one entry point, one module per subcommand.

Each module in authz/commands/ exposes `add_parser(subparsers)` and
`run(args) -> int`; modules import their heavy dependencies inside `run` so
that `egress-authz check` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Order is the order `--help` lists them in.
COMMANDS = (
    "check",
    "lint",
    "serve",
    "render",
    "traces",
    "explain",
    "suggest",
    "imports",  # the `import` command (a module may not be named import)
    "demo",
)

EXIT_ALLOWED = 0
EXIT_DENIED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-authz",
        description="Per-workload, per-hostname egress authorization for Istio meshes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"authz.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"authz.commands.{name}":
                continue  # not built in this version
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `egress-authz render | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
