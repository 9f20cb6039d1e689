"""`egress-authz`: one entry point, one module per subcommand.

Each module in authz/commands/ exposes `add_parser(subparsers)` and
`run(args) -> int`; modules import their heavy dependencies inside `run` so
that `egress-authz check` starts fast. Exit codes: authz/commands/exits.py.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .commands import exits

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
    "ui",
    "demo",
)

EXIT_ALLOWED = exits.OK
EXIT_DENIED = exits.NO
EXIT_USAGE = exits.USAGE


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("egress-authz")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egress-authz",
        description="Per-workload, per-hostname egress authorization for Istio meshes. "
        "Exit codes: 0 allowed/clean, 1 denied or failed, 2 usage or policy errors.",
    )
    parser.add_argument("--version", action="version", version=f"egress-authz {version()}")
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


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand, so that its errors print its own usage."""
    for action in parser._actions:  # argparse keeps the subparsers here, nowhere public
        if isinstance(action, argparse._SubParsersAction):
            found = action.choices.get(command)
            if isinstance(found, argparse.ArgumentParser):
                return found
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: an unknown flag after a subcommand is that subcommand's
    # error (with its usage), not the top-level parser's.
    args, extra = parser.parse_known_args(argv)
    command = _subparser(parser, args.command)
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code: int = args.run(args)
    except exits.UsageError as e:
        command.print_usage(sys.stderr)
        print(f"{command.prog}: error: {e}", file=sys.stderr)
        return exits.USAGE
    except KeyboardInterrupt:
        return exits.INTERRUPTED
    except BrokenPipeError:
        # `egress-authz render | head`: the reader left; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


if __name__ == "__main__":
    sys.exit(main())
