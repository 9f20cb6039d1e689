"""`egress-authz check`: one decision, offline, against policy files.

The same engine as the service, fed from the command line instead of a
CheckRequest: the quickest way to answer "would this be allowed?".
"""

from __future__ import annotations

import argparse
import json
from types import MappingProxyType
from typing import Any

from ..model import Decision, Destination, Identity, NamespacePolicy, Protocol, Workload
from . import exits
from ._common import (
    add_cluster_domain,
    add_cluster_namespace,
    add_output,
    load_or_report,
    parse_host_arg,
)
from .exits import UsageError

EXIT_ALLOWED, EXIT_DENIED, EXIT_ERROR = exits.OK, exits.NO, exits.USAGE


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="decide one request against policy files",
        description="Decide one request offline. Exit 0 when allowed (also audit), 1 when "
        "denied, 2 for usage or policy errors.",
    )
    p.add_argument(
        "--policies",
        required=True,
        metavar="PATH",
        help="a YAML file or a directory of policy ConfigMaps",
    )
    p.add_argument(
        "--principal",
        required=True,
        metavar="SPIFFE_URI",
        help="the caller, e.g. spiffe://cluster.local/ns/shop/sa/cart",
    )
    p.add_argument(
        "--host",
        required=True,
        metavar="NAME",
        help="destination host: the Host header for http, the SNI for tls; a URL "
        "(https://api.kadath.io/v1) also sets the port, protocol and path it implies",
    )
    p.add_argument(
        "--port", type=int, metavar="N",
        help="destination port (default 443 for tls; for http the --host port, else 80)"
    )
    p.add_argument("--sni", metavar="NAME", help="TLS SNI, when it differs from --host")
    p.add_argument(
        "--protocol",
        type=str.lower,
        choices=("tls", "http"),
        default=None,
        help="tls (default) or http (default when --method or --path is given)",
    )
    p.add_argument("--method", metavar="M", help="HTTP method")
    p.add_argument("--path", metavar="P", help="HTTP path")
    p.add_argument(
        "--labels",
        default=None,
        metavar="k=v,k2=v2",
        help="the calling Pod's labels (rules that select by label need them)",
    )
    p.add_argument("--trust-domain", default="cluster.local", metavar="D")
    add_output(p, "text", "json")
    add_cluster_namespace(p)
    add_cluster_domain(p)
    p.set_defaults(run=run)


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--labels: {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "allowed": decision.allowed,
        "verdict": decision.verdict.value,
        "reason": decision.reason.value,
        "rule": decision.rule,
        "owner": decision.owner,
        "decision_id": decision.decision_id,
        "host": decision.host,
        "workload": decision.workload,
        "mode": decision.mode.value,
        "revision": decision.revision,
        "message": decision.message,
        "policy_source": decision.policy_source,
        "explanation": [
            {"rule": c.rule, "matched": c.matched, "why": c.why, "owner": c.owner}
            for c in decision.explanation
        ],
    }


def decision_text(decision: Decision, dest: Destination, port: int) -> str:
    verdict = decision.verdict.value.upper()
    where = f"{decision.host or dest.http_host or dest.sni}:{port} ({dest.protocol.value})"
    lines = [
        f"{verdict}  {decision.workload or '?'} -> {where}",
        f"  reason:   {decision.reason.value}",
    ]
    if decision.message:
        lines.append(f"  why:      {decision.message}")
    if decision.rule:
        owner = f" (owner {decision.owner})" if decision.owner else ""
        label = "rule:    " if decision.verdict.value == "allow" else "nearest: "
        lines.append(f"  {label} {decision.rule}{owner}")
    lines.append(f"  mode:     {decision.mode.value}, policy revision {decision.revision}")
    lines.append(f"  decision: {decision.decision_id}")
    if decision.explanation:
        lines.append("  rules considered:")
        for c in decision.explanation:
            mark = "+" if c.matched else "-"
            lines.append(f"    {mark} {c.rule}: {c.why}")
    if (not decision.allowed or decision.verdict.value == "audit") and decision.policy_source:
        lines.append(f"  to change this, edit: {decision.policy_source}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    labels = parse_labels(args.labels or "")
    target = parse_host_arg("--host", args.host)
    if target.port is not None and args.port is not None and target.port != args.port:
        raise UsageError(f"--port {args.port} contradicts the port of --host {args.host}")
    loaded = load_or_report(args.policies, args.cluster_namespace, args.cluster_domain)
    if loaded is None:
        return EXIT_ERROR
    from ..engine import compile_policy, decide, parse_principal
    from ..loader import build_policy_set

    protocol_flag = args.protocol
    if protocol_flag is None and target.scheme is not None:
        protocol_flag = "http" if target.scheme == "http" else "tls"
    protocol = (
        Protocol.HTTP
        if protocol_flag == "http" or (protocol_flag is None and (args.method or args.path))
        else Protocol.TLS
    )
    port = args.port if args.port is not None else target.port
    if port is None and protocol is Protocol.HTTP:
        # `--host x:8080`: the port the client dialled (a Host port that differs from
        # --port is judged port-mismatch, as at the gateway).
        from ..hosts import normalize_or_reason

        port = normalize_or_reason(target.host, with_port=True)[1]
    if port is None:
        port = 80 if protocol is Protocol.HTTP else 443
    if not 0 < port <= 65535:
        raise UsageError(f"--port {port} is out of range 1-65535")
    if protocol is Protocol.HTTP:
        dest = Destination(
            port,
            protocol,
            sni=args.sni,
            http_host=target.host,
            method=(args.method or "GET").upper(),
            path=args.path or target.path or "/",
        )
    else:
        dest = Destination(
            port, protocol, sni=args.sni or target.host, http_host=target.host if args.sni else None
        )
    namespace, account, _ = parse_principal(args.principal, args.trust_domain)
    workload = (
        Workload(namespace, account, MappingProxyType(labels), name="(command line)")
        if namespace
        else None
    )
    snapshot = compile_policy(
        build_policy_set(loaded.policies, revision=1), trust_domain=args.trust_domain
    )
    decision = decide(snapshot, Identity(args.principal, "", workload), dest)
    unlabelled = (
        _rules_needing_labels(decision, loaded.policies)
        if args.labels is None and not decision.allowed
        else []
    )
    if args.output == "json":
        doc = decision_json(decision)
        if unlabelled:
            doc["labels_not_given"] = unlabelled
        print(json.dumps(doc, indent=2))
    else:
        print(decision_text(decision, dest, port))
        if unlabelled:
            rules = ("rule " if len(unlabelled) == 1 else "rules ") + ", ".join(unlabelled)
            verb = "selects" if len(unlabelled) == 1 else "select"
            print(
                f"  note:     labels not given: {rules} {verb} by label, so cannot match "
                "without them; pass the calling Pod's labels with --labels k=v,..."
            )
    return EXIT_ALLOWED if decision.allowed else EXIT_DENIED


def _rules_needing_labels(decision: Decision, policies: list[NamespacePolicy]) -> list[str]:
    """Rules among those considered that select by label: without --labels they
    cannot match, which the caller should be told rather than left to guess."""
    considered = {c.rule for c in decision.explanation if not c.matched}
    return [
        f"{p.source}/{r.name}"
        for p in policies
        for r in p.rules
        if f"{p.source}/{r.name}" in considered and r.workloads.uses_labels
    ]
