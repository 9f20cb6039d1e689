"""`egress-authz traces`: recorded decisions from a running server, as a table.

Reads the admin endpoint's ring buffer (`/v1/decisions`) or, with --follow,
its live stream. The table's columns and the JSON fields are a public
contract (docs/tracing.md, "CLI").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from . import exits
from ._common import add_output

EXIT_OK = exits.OK
EXIT_ERROR = exits.NO
DEFAULT_LIMIT = 50

COLUMNS = ("TIME", "WORKLOAD", "DESTINATION", "VERDICT", "REASON", "RULE", "LATENCY")
# Fixed widths for --follow, where rows arrive before their widths are known;
# a longer cell is shortened in the middle so that the columns stay aligned.
_FOLLOW_WIDTHS = (12, 24, 30, 7, 20, 40, 8)
# The widest a column may grow in the table (names may be hundreds of characters).
_MAX_WIDTH = 60
# A denial's rule is the one that came nearest to allowing, not one that applied.
NEAREST = "nearest: "


def add_server_argument(parser: argparse.ArgumentParser) -> None:
    from .admin_client import SERVER_ENV

    parser.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help=f"admin endpoint of `egress-authz serve` (default: ${SERVER_ENV} "
        "or http://127.0.0.1:9090)",
    )


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "traces",
        help="show recorded decisions from a running server",
        description="Show the decisions a running `egress-authz serve` recorded, newest last; "
        "--follow streams new ones as they happen.",
    )
    add_server_argument(p)
    p.add_argument("--namespace", "-n", metavar="NS", help="source namespace")
    p.add_argument(
        "--workload", metavar="W", help="NS/SERVICE_ACCOUNT, a service account, or a pod name"
    )
    p.add_argument("--host", metavar="H", help="destination host, or *.suffix")
    p.add_argument("--verdict", type=str.lower, choices=("deny", "audit", "allow"))
    p.add_argument("--reason", metavar="CODE", help="reason code, e.g. host-not-allowed")
    p.add_argument(
        "--since",
        type=since_value,
        metavar="AGE",
        help="only decisions newer than this (30s, 10m, 2h, or an RFC 3339 time); "
        "with --follow, replay those first",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"most decisions to list (default {DEFAULT_LIMIT}); with --follow, stop after "
        "this many",
    )
    p.add_argument("--follow", "-f", action="store_true", help="stream new decisions live")
    from .replicas import add_kube_arguments

    add_kube_arguments(p)
    add_output(p, "table", "json")
    p.set_defaults(run=run)


def since_value(text: str) -> str:
    """--since checked before asking the server: a bad value is a usage error (exit 2)."""
    import argparse

    from ..observe.query import QueryError, parse_since

    try:
        parse_since(text)
    except QueryError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


# ---------------------------------------------------------------------------
# Formatting, shared with `explain`


def short_time(rfc3339: str | None) -> str:
    """Local wall-clock time of day with milliseconds, as people read logs."""
    if not rfc3339:
        return "-"
    try:
        moment = datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).astimezone()
    except ValueError:
        return rfc3339
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def workload_of(d: Mapping[str, Any]) -> str:
    if d.get("namespace") and d.get("service_account"):
        return f"{d['namespace']}/{d['service_account']}"
    return str(d.get("principal") or d.get("source_ip") or "?")


def destination_of(d: Mapping[str, Any]) -> str:
    host = d.get("host") or d.get("sni") or d.get("http_host") or "?"
    port = d.get("port")
    return f"{host}:{port}" if port else str(host)


def latency_of(d: Mapping[str, Any]) -> str:
    us = d.get("latency_us")
    if us is None:
        return "-"
    return f"{us / 1000:.1f}ms" if us >= 1000 else f"{us:.0f}µs"


def rule_of(d: Mapping[str, Any]) -> str:
    rule = d.get("rule")
    if not rule:
        return "-"
    return str(rule) if d.get("verdict") == "allow" else NEAREST + str(rule)


def row_of(d: Mapping[str, Any]) -> tuple[str, ...]:
    return (
        short_time(d.get("time")),
        workload_of(d),
        destination_of(d),
        str(d.get("verdict") or "?"),
        str(d.get("reason") or "?"),
        rule_of(d),
        latency_of(d),
    )


def fit(cell: str, width: int) -> str:
    """`cell` in at most `width` characters: both ends kept (namespace and rule
    name, host and port), the middle replaced by an ellipsis."""
    if len(cell) <= width:
        return cell
    tail = (width - 1) // 2
    return cell[: width - 1 - tail] + "…" + cell[len(cell) - tail :]


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(fit(c, w).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def render_table(decisions: Iterable[Mapping[str, Any]]) -> str:
    decisions = list(decisions)
    columns: tuple[str, ...] = COLUMNS
    rows = [row_of(d) for d in decisions]
    if any("replica" in d for d in decisions):  # --kube: which replica answered
        columns = (*COLUMNS, "REPLICA")
        rows = [(*r, str(d.get("replica") or "?")) for r, d in zip(rows, decisions, strict=True)]
    widths = [
        min(_MAX_WIDTH, max(len(c), *(len(r[i]) for r in rows))) for i, c in enumerate(columns)
    ]
    return "\n".join(_line(r, widths) for r in [columns, *rows]) + "\n"


# ---------------------------------------------------------------------------


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from .admin_client import AdminError
    from .replicas import client_for

    out = out or sys.stdout
    try:
        client = client_for(args, "egress-authz traces")
    except AdminError as e:
        print(f"egress-authz traces: {e}", file=sys.stderr)
        return EXIT_ERROR
    filters = {
        "namespace": args.namespace,
        "workload": args.workload,
        "host": args.host,
        "verdict": args.verdict,
        "reason": args.reason,
        "since": args.since,
    }
    try:
        if args.follow:
            return _follow(client, {**filters, "limit": args.limit}, args.output, out)
        found = client.decisions(limit=args.limit or DEFAULT_LIMIT, **filters)
    except AdminError as e:
        print(f"egress-authz traces: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        _close(client)
    found.reverse()  # oldest first, newest at the bottom, like a log
    if args.output == "json":
        json.dump(found, out, indent=2)
        out.write("\n")
    elif found:
        out.write(render_table(found))
    else:
        print("no recorded decisions match", file=sys.stderr)
    return EXIT_OK


def _close(client: Any) -> None:
    close = getattr(client, "close", None)  # a ReplicaClient's forwarders
    if callable(close):
        close()


def _follow(client: Any, filters: dict[str, Any], output: str, out: TextIO) -> int:
    replicas = hasattr(client, "replicas")
    columns: tuple[str, ...] = COLUMNS
    widths: tuple[int, ...] = _FOLLOW_WIDTHS
    if replicas:
        columns, widths = (*COLUMNS, "REPLICA"), (*_FOLLOW_WIDTHS, 30)
    if output == "table":
        out.write(_line(columns, widths) + "\n")
        out.flush()
    # Under `| head` the reader may go away; that ends the command quietly.
    try:
        for d in client.stream(**filters):
            if output == "json":
                out.write(json.dumps(d, separators=(",", ":")) + "\n")
            else:
                row = row_of(d) + ((str(d.get("replica") or "?"),) if replicas else ())
                out.write(_line(row, widths) + "\n")
            out.flush()
    except BrokenPipeError:
        return EXIT_OK
    return EXIT_OK
