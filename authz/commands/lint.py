"""`egress-authz lint`: validate policy files the way the service would."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..hosts import HostError, normalize
from ..loader import build_policy_set, load_path
from ._common import add_cluster_namespace


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lint",
        help="validate policy ConfigMaps and print every error with its location",
        description="Validate policy ConfigMaps (files or a directory). Exit 0 when all are "
        "valid, 1 on any error, 2 when PATH cannot be read.",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--explain", metavar="NAME", help="show which rules would match this host")
    p.add_argument("--output", choices=("text", "json"), default="text")
    add_cluster_namespace(p)
    p.set_defaults(run=run)


def _unfenced_wildcards(policies: list[Any]) -> list[str]:
    """Offline, no NetworkPolicy is known: every namespace policy with a wildcard host is
    one to fence (`serve --kube` reports only those that really are not)."""
    from ..fence import FENCE_LABEL, unfenced_wildcards, wildcard_hosts

    return [f"{p.source}: wildcard host(s) {', '.join(wildcard_hosts(p))} cannot be routed "
            f"through the egress gateway; unless a NetworkPolicy fences namespace {ns} "
            f"(label it {FENCE_LABEL}=true), its pods reach them directly"
            for ns, ps in sorted(unfenced_wildcards(policies, {}).items()) for p in ps]


def run(args: argparse.Namespace) -> int:
    result = load_path(args.path, cluster_namespace=args.cluster_namespace)
    result.warnings.extend(_unfenced_wildcards(result.policies))
    matches: list[dict[str, str]] = []
    host_error = None
    if args.explain:
        from ..engine import compile_policy, rules_matching_host

        try:
            host = normalize(args.explain, with_port=True)
        except HostError as e:
            host_error = f"--explain {args.explain!r}: {e.reason.value}: {e.message}"
        else:
            snapshot = compile_policy(build_policy_set(result.policies))
            matches = [
                {"rule": ref, "pattern": pattern}
                for ref, pattern in rules_matching_host(snapshot, host)
            ]
    rules = sum(len(p.rules) for p in result.policies)
    if args.output == "json":
        print(
            json.dumps(
                {
                    "valid": not result.problems,
                    "configmaps": len(result.by_ref),
                    "rules": rules,
                    "errors": result.problems,
                    "warnings": result.warnings,
                    **(
                        {"explain": {"host": args.explain, "matches": matches, "error": host_error}}
                        if args.explain
                        else {}
                    ),
                },
                indent=2,
            )
        )
    else:
        for problem in result.problems:
            print(f"error: {problem}")
        for warning in result.warnings:
            print(f"warning: {warning}")
        if args.explain:
            if host_error:
                print(host_error)
            elif matches:
                print(f"rules naming {args.explain}:")
                for m in matches:
                    print(f"  {m['rule']}  (via {m['pattern']})")
            else:
                print(f"no rule names {args.explain}: it is denied for everyone")
        status = "OK" if not result.problems else f"{len(result.problems)} error(s)"
        print(
            f"{len(result.files)} file(s), {len(result.by_ref)} policy ConfigMap(s), "
            f"{rules} rule(s): {status}",
            file=sys.stderr,
        )
    if not result.files and result.problems:
        return 2
    return 1 if result.problems or host_error else 0
