"""Helpers shared by the commands: flags every command spells the same way,
and policy loading for the offline commands (check, lint, render)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..hosts import DEFAULT_CLUSTER_DOMAIN, PatternError, parse_cluster_domain
from ..loader import DEFAULT_CLUSTER_NAMESPACE, LoadResult, load_path
from .exits import UsageError


def add_cluster_namespace(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-namespace",
        default=DEFAULT_CLUSTER_NAMESPACE,
        metavar="NS",
        help="namespace whose ConfigMap labelled egress-authz.io/tier=cluster is the cluster "
        f"policy (default {DEFAULT_CLUSTER_NAMESPACE})",
    )


def cluster_domain_arg(text: str) -> str:
    """argparse type of --cluster-domain: a DNS name, canonical."""
    try:
        return parse_cluster_domain(text)
    except PatternError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from e


def add_cluster_domain(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cluster-domain",
        type=cluster_domain_arg,
        default=DEFAULT_CLUSTER_DOMAIN,
        metavar="DOMAIN",
        help="the cluster's DNS domain: namespace policies may not allow hosts under it "
        f"(default {DEFAULT_CLUSTER_DOMAIN})",
    )


def add_output(p: argparse.ArgumentParser, *choices: str) -> None:
    """`-o/--output`, the same on every command that prints data; any case."""
    p.add_argument(
        "-o",
        "--output",
        type=str.lower,
        choices=choices,
        default=choices[0],
        help=f"{' or '.join(choices)} (default: %(default)s)",
    )


@dataclass(frozen=True)
class HostArg:
    """What a --host (or --explain) value named: a host, and what a URL added."""

    host: str
    port: int | None = None
    scheme: str | None = None  # "http" or "https" when a URL was given
    path: str | None = None


def parse_host_arg(flag: str, text: str) -> HostArg:
    """A host name, `host:port`, or a URL people paste (`https://api.kadath.io/`).

    Anything else that is not a name (a path, userinfo, an unknown scheme) is a
    usage error saying what was expected, never a confusing port error later.
    """
    text = text.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            raise UsageError(f"{flag} {text!r}: only http:// and https:// URLs name a host")
        if parts.username is not None or parts.password is not None:
            raise UsageError(f"{flag} {text!r}: a URL with user info names no single host")
        try:
            port = parts.port
        except ValueError as e:
            raise UsageError(f"{flag} {text!r}: {e}") from e
        if not parts.hostname:
            raise UsageError(f"{flag} {text!r}: the URL has no host")
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return HostArg(host, port, parts.scheme, path)
    if "/" in text or "@" in text:
        raise UsageError(
            f"{flag} {text!r}: give a host name (api.kadath.io) or a URL "
            "(https://api.kadath.io/), not a path"
        )
    return HostArg(text)


def load_or_report(path: str, cluster_namespace: str,
                   cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> LoadResult | None:
    """Load policies; print problems to stderr and return None if there are any.

    A path that does not exist is a usage error (exit 2 like policy errors,
    but said as such)."""
    result = load_path(path, cluster_namespace=cluster_namespace, cluster_domain=cluster_domain)
    if not result.files and not _exists(path):
        raise UsageError(f"{path}: no such file or directory")
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


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()
