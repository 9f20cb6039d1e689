"""Helpers shared by the offline commands (check, lint, render)."""

from __future__ import annotations

import argparse
import sys

from ..loader import DEFAULT_CLUSTER_NAMESPACE, LoadResult, load_path


def add_cluster_namespace(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-namespace",
        default=DEFAULT_CLUSTER_NAMESPACE,
        metavar="NS",
        help="namespace whose ConfigMap labelled egress-authz.io/tier=cluster is the cluster "
        f"policy (default {DEFAULT_CLUSTER_NAMESPACE})",
    )


def load_or_report(path: str, cluster_namespace: str) -> LoadResult | None:
    """Load policies; print problems to stderr and return None if there are any."""
    result = load_path(path, cluster_namespace=cluster_namespace)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.problems:
        for problem in result.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(
            f"{len(result.problems)} policy error(s); fix them first (egress-authz lint {path})",
            file=sys.stderr,
        )
        return None
    return result
