"""`egress-authz import --from SOURCE PATH...`: policies from the tool a team leaves.

Prints policy ConfigMaps (stdout) and a report of every source element
(stderr, and as comments above each rule). Exit 0: everything translated
exactly; 1: something was narrowed or not translated (read the report);
2: the input could not be read.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import exits
from ._common import add_cluster_domain, add_cluster_namespace, add_output

EXIT_EXACT = exits.OK
EXIT_LOSSY = exits.NO  # something was narrowed or not translated: read the report
EXIT_UNREADABLE = exits.USAGE  # a path that does not exist, a file that is not YAML/JSON


def add_parser(sub: Any) -> None:
    from ..importers import SOURCES

    p = sub.add_parser(
        "import",
        help="translate Cilium, GKE, AdminNetworkPolicy, Squid, AWS or ServiceEntry egress "
        "allowlists into policy ConfigMaps",
        description="Translate FQDN egress policies written for another system into policy "
        "ConfigMaps, never allowing more than the source did. Exit 0 when every element was "
        "translated exactly, 1 when something was narrowed or dropped (see the report on "
        "stderr), 2 when the input cannot be read. See docs/migrating.md.",
    )
    p.add_argument("--from", dest="source", required=True, type=str.lower, choices=list(SOURCES))
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    p.add_argument(
        "--namespace",
        "-n",
        metavar="NS",
        help="namespace for sources without one (Squid, AWS, objects without "
        "metadata.namespace); Squid and AWS go to the cluster tier without it",
    )
    add_output(p, "yaml", "json")
    p.add_argument(
        "--mode",
        type=str.lower,
        choices=("enforce", "audit"),
        help="write this mode into the namespace policies (audit: roll out without breaking)",
    )
    add_cluster_namespace(p)
    add_cluster_domain(p)
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary on stderr")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..importers import Options, translate
    from ..importers.common import ImportError_
    from ..importers.emit import build, render, report_lines

    options = Options(namespace=args.namespace, cluster_namespace=args.cluster_namespace)
    try:
        translation = translate(args.source, args.paths, options)
    except ImportError_ as e:
        print(f"egress-authz import: {e}", file=sys.stderr)
        return EXIT_UNREADABLE
    result = build(
        translation,
        source=args.source,
        origin=", ".join(args.paths),
        cluster_namespace=args.cluster_namespace,
        mode=args.mode,
        cluster_domain=args.cluster_domain,
    )
    if result.configmaps:
        print(render(result, args.output))
    lines = report_lines(result)
    for line in lines if not args.quiet else lines[-1:]:
        print(line, file=sys.stderr)
    if not result.configmaps:
        print("nothing could be imported: no policy was written", file=sys.stderr)
    return EXIT_LOSSY if result.lossy or not result.configmaps else EXIT_EXACT
