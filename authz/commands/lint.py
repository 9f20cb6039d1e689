"""`egress-authz lint`: validate policy files the way the service would.

A lint that checked nothing must not pass: a path with no policy ConfigMap,
or a ConfigMap ignored for its label, exits 1 (the service would ignore it
too, and a green CI would hide that).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .. import hosts
from ..hosts import HostError, normalize
from ..loader import LoadResult, build_policy_set, load_path
from ..model import Tier
from . import exits
from ._common import add_cluster_domain, add_cluster_namespace, add_output, parse_host_arg
from .exits import UsageError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "lint",
        help="validate policy ConfigMaps and print every error with its location",
        description="Validate policy ConfigMaps (files or a directory). Exit 0 when all are "
        "valid; 1 when nothing was checked (no policy ConfigMap, or one ignored for its "
        "label) or, with --strict, on any warning; 2 on policy errors or when PATH does "
        "not exist.",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument(
        "--explain",
        metavar="NAME",
        help="which rules, in every namespace, name this host (a name or a URL), and "
        "whether the cluster policy denies it",
    )
    p.add_argument(
        "--strict", action="store_true", help="exit 1 on any warning too (e.g. an expired rule)"
    )
    add_output(p, "text", "json")
    add_cluster_namespace(p)
    add_cluster_domain(p)
    p.set_defaults(run=run)


def expired_warnings(result: LoadResult, now: float | None = None) -> list[str]:
    """Rules whose `expires` has passed: valid, but never applied any more."""
    now = time.time() if now is None else now
    return [
        f'{policy.source} rules[{rule.index}] "{rule.name}" expires: {rule.expires_text} is '
        "already expired: the rule is not applied"
        for policy in result.policies
        for rule in policy.rules
        if rule.expires is not None and rule.expires <= now
    ]


def unfenced_wildcard_warnings(result: LoadResult) -> list[str]:
    """Namespace policies with a wildcard host whose namespace nothing under PATH fences:
    no Namespace labelled egress-authz.io/egress-fence=true, no fencing NetworkPolicy
    (`serve --kube` judges the same against the cluster)."""
    from ..fence import FENCE_LABEL, unfenced_wildcards, wildcard_hosts
    from ..yamlload import FILE_LIMITS, YamlError, load_all

    fenced: set[str] = set()
    netpols: dict[str, list[dict[str, Any]]] = {}
    for path in result.files:  # already read once by the loader, which reported problems
        try:
            # Through the limits again: a file the loader refused may be here (a
            # plain parser would recurse 50,000 levels deep, or stall on a number).
            with path.open("rb") as stream:
                raw = stream.read(FILE_LIMITS.max_bytes + 1)
            if len(raw) > FILE_LIMITS.max_bytes:
                continue  # reported by the loader; never read whole
            docs = [d for d in load_all(raw.decode(), FILE_LIMITS) if isinstance(d, dict)]
        except (OSError, UnicodeError, YamlError):
            continue  # the loader has reported it
        for d in docs:
            meta = d.get("metadata")
            if not isinstance(meta, dict):
                continue
            labels = meta.get("labels")
            if not isinstance(labels, dict):
                labels = {}
            if d.get("kind") == "Namespace" and labels.get(FENCE_LABEL) == "true":
                fenced.add(str(meta.get("name")))
            elif d.get("kind") == "NetworkPolicy":
                netpols.setdefault(str(meta.get("namespace") or "default"), []).append(d)
    found = unfenced_wildcards(result.policies, netpols)
    return [f"{p.source}: wildcard host(s) {', '.join(wildcard_hosts(p))} cannot be routed "
            f"through the egress gateway; unless a NetworkPolicy fences namespace {ns} "
            f"(label it {FENCE_LABEL}=true), its pods reach them directly"
            for ns, ps in sorted(found.items()) if ns not in fenced for p in ps]


def _explain(result: LoadResult, name: str) -> dict[str, Any]:
    from ..engine import compile_policy, rules_matching_host

    target = parse_host_arg("--explain", name)
    try:
        host = normalize(target.host, with_port=True)
    except HostError as e:
        raise UsageError(f"--explain {name!r}: {e.reason.value}: {e.message}") from e
    denied_by = [
        f"{p.source} deny[{i}] {pattern!r}"
        for p in result.policies
        if p.tier is Tier.CLUSTER
        for i, pattern in enumerate(p.deny)
        if hosts.matches(pattern, host)
    ]
    snapshot = compile_policy(build_policy_set(result.policies))
    matches = [
        {"rule": ref, "pattern": pattern} for ref, pattern in rules_matching_host(snapshot, host)
    ]
    return {"host": host, "matches": matches, "cluster_denied_by": denied_by}


def run(args: argparse.Namespace) -> int:
    result = load_path(args.path, cluster_namespace=args.cluster_namespace,
                       cluster_domain=args.cluster_domain)
    if not result.files and result.problems:
        raise UsageError("; ".join(result.problems))
    explained = _explain(result, args.explain) if args.explain else None
    warnings = [*result.warnings, *expired_warnings(result),
                *unfenced_wildcard_warnings(result)]
    rules = sum(len(p.rules) for p in result.policies)
    checked = len(result.by_ref)
    if result.problems:
        code, status = exits.USAGE, f"{len(result.problems)} error(s)"
    elif not checked or result.ignored:
        code = exits.NO
        status = (
            f"{len(result.ignored)} ConfigMap(s) ignored for their label (see the warnings)"
            if result.ignored
            else "nothing checked: no policy ConfigMap found"
        )
    elif warnings and args.strict:
        code, status = exits.NO, f"{len(warnings)} warning(s), and --strict"
    else:
        code, status = exits.OK, "OK" + (f", {len(warnings)} warning(s)" if warnings else "")
    if args.output == "json":
        doc: dict[str, Any] = {
            "valid": code == exits.OK,
            "configmaps": checked,
            "rules": rules,
            "errors": result.problems,
            "warnings": warnings,
            "ignored": [str(ref) for ref in result.ignored],
        }
        if explained is not None:
            doc["explain"] = explained
        print(json.dumps(doc, indent=2))
        return code
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if explained is not None:
        _print_explained(explained)
    summary = (
        f"{len(result.files)} file(s), {checked} policy ConfigMap(s), {rules} rule(s): {status}"
    )
    # The answer goes to stdout when it is good news, to stderr beside the errors when not.
    print(summary, file=sys.stdout if code == exits.OK else sys.stderr)
    return code


def _print_explained(explained: dict[str, Any]) -> None:
    host = explained["host"]
    for deny in explained["cluster_denied_by"]:
        print(f"{host} is denied by the cluster policy: {deny}; no rule can allow it")
    if explained["matches"]:
        print(f"rules naming {host}:")
        for m in explained["matches"]:
            print(f"  {m['rule']}  (via {m['pattern']})")
    elif not explained["cluster_denied_by"]:
        print(f"no rule names {host}: it is denied for everyone")
