"""`egress-authz suggest --namespace NS`: a policy that allows what was observed.

For a team rolling out audit mode: run the namespace in `mode: audit`, let
traffic flow, then turn the recorded deny and audit verdicts into a policy
ConfigMap, one rule per service account (and port/protocol set), to review
and apply. Denials no namespace policy can lift (cluster deny, IP literals,
untrusted identities...) are listed in a comment, never turned into rules.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from ..hosts import public_suffix_problem
from .traces import EXIT_ERROR, EXIT_OK, add_server_argument

# Reasons a rule in the namespace's own policy can turn into an allow.
FIXABLE = frozenset(
    {
        "host-not-allowed",
        "no-policy",
        "port-not-allowed",
        "protocol-not-allowed",
        "method-not-allowed",
        "path-not-allowed",
        "rule-expired",
    }
)
# Labels that differ between Pods of one workload; never worth suggesting.
_VOLATILE_LABELS = ("pod-template-hash", "controller-revision-hash", "pod-template-generation")
MAX_DECISIONS = 100_000
MAX_PATHS = 10  # more distinct paths than this for one host: propose their common prefix


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "suggest",
        help="print a policy ConfigMap allowing what a namespace was denied (or audited)",
        description="From the deny and audit decisions a running server recorded for one "
        "namespace, print a policy ConfigMap that would allow exactly what was observed.",
    )
    p.add_argument("--namespace", "-n", metavar="NS", required=True)
    add_server_argument(p)
    p.add_argument("--since", metavar="AGE", help="only decisions newer than this (e.g. 1h)")
    p.add_argument(
        "--wildcards",
        action="store_true",
        help="propose *.domain when two or more hosts share a parent domain",
    )
    p.add_argument(
        "--name",
        default="egress-policy-suggested",
        help="name of the ConfigMap to print (default egress-policy-suggested)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from ..client import AdminClient, AdminError

    out = out or sys.stdout
    client = AdminClient(args.server)
    try:
        found = [
            d
            for verdict in ("deny", "audit")
            for d in client.decisions(
                namespace=args.namespace, verdict=verdict, since=args.since, limit=MAX_DECISIONS
            )
        ]
    except AdminError as e:
        print(f"egress-authz suggest: {e}", file=sys.stderr)
        return EXIT_ERROR
    if not found:
        print(
            f"no deny or audit decisions recorded for namespace {args.namespace}: "
            "nothing to suggest",
            file=sys.stderr,
        )
        return EXIT_OK
    out.write(suggest_configmap(found, args.namespace, name=args.name, wildcards=args.wildcards))
    return EXIT_OK


# ---------------------------------------------------------------------------


def _flow(items: Iterable[Any]) -> str:
    """A YAML flow list; host patterns starting with '*' must be quoted."""
    return "[" + ", ".join(f'"{i}"' if str(i).startswith("*") else str(i) for i in items) + "]"


def rule_lines(
    name: str,
    accounts: Iterable[str],
    hosts: Iterable[str],
    ports: Iterable[int],
    protocols: Iterable[str],
    methods: Iterable[str] = (),
    paths: Iterable[str] = (),
) -> list[str]:
    lines = [
        f"- name: {name}",
        "  workloads:",
        f"    serviceAccounts: {_flow(sorted(accounts))}",
        f"  hosts: {_flow(hosts)}",
        f"  ports: {_flow(sorted(ports))}",
        f"  protocols: {_flow(sorted(protocols))}",
    ]
    methods, paths = sorted(methods), sorted(paths)
    if methods or paths:
        lines.append("  http:")
        if methods:
            lines.append(f"    methods: {_flow(methods)}")
        if paths:
            lines.append("    paths: [" + ", ".join(json.dumps(p) for p in paths) + "]")
    return lines


def _path_prefixes(paths: set[str]) -> list[str]:
    """Observed paths (query dropped) as prefixes; many become their common prefix."""
    clean = {p.split("?", 1)[0] or "/" for p in paths}
    if len(clean) <= MAX_PATHS:
        return sorted(clean)
    parts = [p.split("/") for p in clean]
    common: list[str] = []
    for segment in zip(*parts, strict=False):
        if len(set(segment)) != 1:
            break
        common.append(segment[0])
    return ["/".join(common) + "/" if len(common) > 1 else "/"]


def _rule_name(account: str, index: int) -> str:
    base = f"{account[:50]}-egress"
    return base if index == 0 else f"{base}-{index + 1}"


def rule_snippet(d: Mapping[str, Any]) -> list[str]:
    """For `explain`: the smallest change that would have allowed this decision."""
    reason = d.get("reason")
    rule = str(d.get("rule") or "").rsplit("/", 1)[-1]
    host = d.get("host")
    if reason == "port-not-allowed":
        return [f"Add port {d.get('port')} to ports of rule {rule}."]
    if reason == "protocol-not-allowed":
        return [f"Add {d.get('protocol')} to protocols of rule {rule}."]
    if reason == "method-not-allowed":
        return [f"Add {d.get('method')} to http.methods of rule {rule}."]
    if reason == "path-not-allowed":
        return [f"Add a prefix of {d.get('path')} to http.paths of rule {rule}."]
    if reason == "rule-expired":
        return [f"Move the expires date of rule {rule} forward, or remove the rule."]
    if reason in ("host-not-allowed", "no-policy") and host and d.get("service_account"):
        account = str(d["service_account"])
        lines = rule_lines(
            _rule_name(account, 0),
            [account],
            [host],
            [d.get("port") or 443],
            [d.get("protocol") or "TLS"],
        )
        return ["For example, add under rules: in policy.yaml:", *("  " + x for x in lines)]
    return []


def _wildcard(hosts: set[str]) -> list[str]:
    """Replace two or more siblings (a.x.io, b.x.io) by *.x.io.

    The parent must be an organisation's domain, never a TLD or a public suffix
    (co.uk, github.io): the policy parser refuses those wildcards.
    """
    by_parent: dict[str, set[str]] = defaultdict(set)
    for h in hosts:
        by_parent[h.partition(".")[2]].add(h)
    out: set[str] = set()
    for parent, children in by_parent.items():
        if len(children) >= 2 and public_suffix_problem(f"*.{parent}") is None:
            out.add(f"*.{parent}")
        else:
            out.update(children)
    return sorted(out, key=lambda h: (h.startswith("*"), h))


def _common_labels(label_sets: list[Mapping[str, str]]) -> dict[str, str]:
    if not label_sets:
        return {}
    common = dict(label_sets[0])
    for labels in label_sets[1:]:
        common = {k: v for k, v in common.items() if labels.get(k) == v}
    return {k: v for k, v in sorted(common.items()) if k not in _VOLATILE_LABELS}


def suggest_configmap(
    decisions: Sequence[Mapping[str, Any]], namespace: str, *, name: str, wildcards: bool = False
) -> str:
    usable = [d for d in decisions if d.get("reason") in FIXABLE and d.get("host")]
    skipped = Counter(
        (str(d.get("reason")), str(d.get("host") or d.get("sni") or "?"))
        for d in decisions
        if d not in usable
    )
    # service account -> host -> (ports, protocols)
    # service account -> host -> (ports, protocols, HTTP methods, HTTP paths)
    seen: dict[str, dict[str, tuple[set[int], set[str], set[str], set[str]]]] = defaultdict(dict)
    labels_seen: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    for d in usable:
        account = str(d.get("service_account") or "")
        entry = seen[account].setdefault(str(d["host"]), (set(), set(), set(), set()))
        entry[0].add(int(d.get("port") or 443))
        entry[1].add(str(d.get("protocol") or "TLS"))
        # HTTP requests are allowed for the methods and paths seen only: a rule
        # without `http` would open every method and path of the host.
        if d.get("protocol") == "HTTP":
            entry[2].add(str(d.get("method") or "GET").upper())
            entry[3].add(str(d.get("path") or "/"))
        labels_seen[account].append(d.get("labels") or {})
    modes = {d.get("mode") for d in usable}
    existing = sorted(
        {
            s.strip()
            for d in usable
            for s in str(d.get("policy_source") or "").split(",")
            if s.strip() and "<" not in s
        }
    )
    times = sorted(str(d.get("time")) for d in decisions if d.get("time"))

    head = [
        f"# Suggested by `egress-authz suggest --namespace {namespace}` from "
        f"{len(decisions)} deny/audit decision(s)"
        + (f", {times[0]} .. {times[-1]}." if times else "."),
        "# It allows exactly what was observed. Review it before applying.",
    ]
    if existing:
        head.append(
            f"# Existing policy: {', '.join(existing)}. Policies in a namespace add up: apply "
            "this beside it, or merge the rules into it."
        )
    for (reason, host), n in sorted(skipped.items()):
        head.append(f"# Left out, no namespace policy can allow it: {n} x {reason} ({host})")

    body = ["mode: audit" if "audit" in modes else "mode: enforce"]
    if "audit" in modes:
        body.append("# Switch to enforce once `egress-authz traces --verdict audit` stays empty.")
    body.append("rules:" if seen else "rules: []")
    for account in sorted(seen):
        Key = tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]
        groups: dict[Key, set[str]] = defaultdict(set)
        for host, (ports, protocols, methods, paths) in seen[account].items():
            key = (
                tuple(sorted(ports)),
                tuple(sorted(protocols)),
                tuple(sorted(methods)),
                tuple(_path_prefixes(paths)) if paths else (),
            )
            groups[key].add(host)
        common = _common_labels(labels_seen[account])
        body.append(f"  # {namespace}/{account}")
        if common:
            body.append(
                "  # labels on every Pod seen (add matchLabels to narrow): "
                + ", ".join(f"{k}={v}" for k, v in common.items())
            )
        for i, ((ports_t, protocols_t, methods_t, paths_t), hosts) in enumerate(
            sorted(groups.items())
        ):
            chosen = _wildcard(hosts) if wildcards else sorted(hosts)
            lines = rule_lines(
                _rule_name(account, i), [account], chosen, ports_t, protocols_t, methods_t, paths_t
            )
            body.extend("  " + line for line in lines)

    doc = [
        *head,
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {name}",
        f"  namespace: {namespace}",
        "  labels:",
        '    egress-authz.io/policy: "true"',
        "data:",
        "  policy.yaml: |",
        *("    " + line for line in body),
    ]
    return "\n".join(doc) + "\n"
