"""`egress-authz demo`: run the whole system on this machine (see authz/demo/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import exits


def add_parser(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        help="run gateway, sidecars, service and fake external hosts on loopback",
        description="Start a real Envoy egress gateway, Envoy sidecars for three workloads, "
        "egress-authz serve with the example policies and local stand-ins for the external "
        "hosts, all on 127.0.0.x; run a script of calls and print each verdict, the traces "
        "view and one explanation. Exits 0 when every verdict is the expected one.",
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="stay up after the calls (until Ctrl-C) and print commands to try",
    )
    p.add_argument(
        "--port-base",
        type=int,
        default=None,
        metavar="PORT",
        help="use the ports from PORT upwards instead of free ones (stable commands)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        metavar="DIR",
        help="write certificates, policies and logs here and keep them (default: a "
        "temporary directory, removed on exit)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from authz.demo.run import Options, main
    except ImportError as e:  # installed without the `demo` extra
        print(
            f"egress-authz demo: {e.name or e} is not installed; the demo needs the `demo` "
            'extra: pip install "egress-authz[demo]" (in a clone: make venv)',
            file=sys.stderr,
        )
        return exits.NO

    return main(
        Options(keep_running=args.keep_running, port_base=args.port_base, workdir=args.workdir)
    )
