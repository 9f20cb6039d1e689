"""`egress-authz suggest --namespace NS`: a policy that allows what was observed.

For a team rolling out audit mode: run the namespace in `mode: audit`, let
traffic flow, then turn the recorded deny and audit verdicts into a policy
ConfigMap to review and apply. Denials no namespace policy can lift (cluster
deny, IP literals, untrusted identities...) and internal hosts no namespace
policy may name are listed in a comment, never turned into rules.

The suggestion never widens: every rule is a cross product (hosts x ports x
protocol x methods x exact paths) of which every combination was observed, so
the policy allows exactly the requests seen (one rule per protocol and port
set; HTTP paths as exactPaths). The one exception is said in a comment: more
than MAX_PATHS paths under one common prefix become that prefix.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from ..hosts import DEFAULT_CLUSTER_DOMAIN, internal_problem, public_suffix_problem
from ..paths import normalize_path
from ._common import add_cluster_domain, add_output
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
DEFAULT_NAME = "egress-policy-suggested"
# The decisions a suggestion is made from (here and on the page, authz/ui).
SUGGESTED_VERDICTS = ("deny", "audit")
MAX_PATHS = 20  # more exact paths than this under one common prefix: propose the prefix


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
        default=DEFAULT_NAME,
        help=f"name of the ConfigMap to print (default {DEFAULT_NAME})",
    )
    add_output(p, "yaml", "json")
    add_cluster_domain(p)
    from .replicas import add_kube_arguments

    add_kube_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from .admin_client import AdminError
    from .replicas import client_for

    out = out or sys.stdout
    client = None
    try:
        client = client_for(args, "egress-authz suggest")
        found = [
            d
            for verdict in SUGGESTED_VERDICTS
            for d in client.decisions(
                namespace=args.namespace, verdict=verdict, since=args.since, limit=MAX_DECISIONS
            )
        ]
    except AdminError as e:
        print(f"egress-authz suggest: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        close = getattr(client, "close", None)  # --kube: the replicas' forwarders
        if callable(close):
            close()
    if not found:
        print(
            f"no deny or audit decisions recorded for namespace {args.namespace}: "
            "nothing to suggest",
            file=sys.stderr,
        )
        return EXIT_OK
    text = suggest_configmap(found, args.namespace, name=args.name, wildcards=args.wildcards,
                             cluster_domain=args.cluster_domain)
    if getattr(args, "output", "yaml") == "json":
        import yaml

        text = json.dumps(yaml.safe_load(text), indent=2) + "\n"  # the comments are lost
    out.write(text)
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
    exact_paths: Iterable[str] = (),
) -> list[str]:
    lines = [
        f"- name: {name}",
        "  workloads:",
        f"    serviceAccounts: {_flow(sorted(accounts))}",
        f"  hosts: {_flow(hosts)}",
        f"  ports: {_flow(sorted(ports))}",
        f"  protocols: {_flow(sorted(protocols))}",
    ]
    methods, paths, exact_paths = sorted(methods), sorted(paths), sorted(exact_paths)
    if methods or paths or exact_paths:
        lines.append("  http:")
        if methods:
            lines.append(f"    methods: {_flow(methods)}")
        if paths:
            lines.append("    paths: [" + ", ".join(json.dumps(p) for p in paths) + "]")
        if exact_paths:
            lines.append("    exactPaths: [" + ", ".join(json.dumps(p) for p in exact_paths) + "]")
    return lines


def _narrowed(paths: frozenset[str]) -> str | None:
    """The prefix that stands for many paths, or None to keep them exact.

    Only past MAX_PATHS, and only a prefix below the root that ends at a
    segment boundary: `/` (every path) is never proposed.
    """
    if len(paths) <= MAX_PATHS:
        return None
    parts = [p.split("/") for p in paths]
    common: list[str] = []
    for segment in zip(*parts, strict=False):
        if len(set(segment)) != 1:
            break
        common.append(segment[0])
    # Drop a last segment that some path only starts with ("/v1/item" vs "/v1/items").
    prefix = "/".join(common) + "/"
    if len(common) < 2 or not all(p.startswith(prefix) for p in paths):
        return None
    return prefix


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
    if reason in ("host-not-allowed", "no-policy") and host and internal_problem(str(host)):
        return [f"{host} is an internal host: no namespace policy may allow it. A cluster admin "
                "can, in the cluster policy with allowInternalHosts: true, if the gateway "
                "should really reach it (docs/security.md, Host names)."]
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
    decisions: Sequence[Mapping[str, Any]], namespace: str, *, name: str, wildcards: bool = False,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
) -> str:
    fixable = [d for d in decisions if d.get("reason") in FIXABLE and d.get("host")]
    # The policy parser refuses these in a namespace policy (SSRF through the gateway).
    internal = Counter(str(d["host"]) for d in fixable
                       if internal_problem(str(d["host"]), cluster_domain) is not None)
    usable = [d for d in fixable if str(d["host"]) not in internal]
    skipped = Counter(
        (str(d.get("reason")), str(d.get("host") or d.get("sni") or "?"))
        for d in decisions
        if d not in fixable
    )
    # account -> (host, protocol, port) -> what was asked there: for HTTP the
    # (method, path) pairs, for TLS nothing more (the gateway sees no more).
    seen: dict[str, dict[tuple[str, str, int], set[tuple[str, str]]]] = defaultdict(
        lambda: defaultdict(set)
    )
    labels_seen: dict[str, list[Mapping[str, str]]] = defaultdict(list)
    unmatchable: Counter[str] = Counter()
    for d in usable:
        account = str(d.get("service_account") or "")
        protocol = str(d.get("protocol") or "TLS")
        where = (str(d["host"]), protocol, int(d.get("port") or 443))
        if protocol == "HTTP":
            path = normalize_path(str(d.get("path") or "/"))
            if path is None or any(c in path for c in "%#"):
                unmatchable[f"{where[0]} {d.get('path')}"] += 1
                continue
            seen[account][where].add((str(d.get("method") or "GET").upper(), path))
        else:
            seen[account].setdefault(where, set())  # TLS: the connection is all there is
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
        "# It allows exactly what was observed (HTTP paths as exactPaths, one rule per",
        "# protocol and port set). Review it before applying.",
    ]
    if existing:
        head.append(
            f"# Existing policy: {', '.join(existing)}. Policies in a namespace add up: apply "
            "this beside it, or merge the rules into it."
        )
    for (reason, host), n in sorted(skipped.items()):
        head.append(f"# Left out, no namespace policy can allow it: {n} x {reason} ({host})")
    for host, n in sorted(internal.items()):
        head.append(f"# Left out, an internal host no namespace policy may name (the cluster "
                    f"policy can, with allowInternalHosts): {n} x {host}")
    for what, n in sorted(unmatchable.items()):
        head.append(f"# Left out, a path no rule can name (escapes): {n} x {what}")

    body = ["mode: audit" if "audit" in modes else "mode: enforce"]
    if "audit" in modes:
        body.append("# Switch to enforce once `egress-authz traces --verdict audit` stays empty.")
    body.append("rules:" if seen else "rules: []")
    for account in sorted(seen):
        common = _common_labels(labels_seen[account])
        body.append(f"  # {namespace}/{account}")
        if common:
            body.append(
                "  # labels on every Pod seen (add matchLabels to narrow): "
                + ", ".join(f"{k}={v}" for k, v in common.items())
            )
        for i, (note, lines) in enumerate(_account_rules(seen[account], account, wildcards)):
            if note:
                body.append(f"  # {note}")
            body.extend("  " + line for line in rule_lines(_rule_name(account, i), **lines))

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


# (methods, exact paths, prefix or "") : one HTTP block of a rule
_Block = tuple[tuple[str, ...], tuple[str, ...], str]


def _blocks(pairs: set[tuple[str, str]]) -> frozenset[_Block]:
    """(method, path) pairs as blocks whose methods x paths were all seen: the
    paths grouped by the exact set of methods each was asked with."""
    methods_of: dict[str, set[str]] = defaultdict(set)
    for method, path in pairs:
        methods_of[path].add(method)
    by_methods: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for path, asked in methods_of.items():
        by_methods[tuple(sorted(asked))].add(path)
    blocks: set[_Block] = set()
    for verbs, group in by_methods.items():
        prefix = _narrowed(frozenset(group))
        blocks.add((verbs, () if prefix else tuple(sorted(group)), prefix or ""))
    return frozenset(blocks)


def _account_rules(
    seen: Mapping[tuple[str, str, int], set[tuple[str, str]]], account: str, wildcards: bool
) -> list[tuple[str, dict[str, Any]]]:
    """The rules for one account: (comment, rule_lines arguments), in a stable order."""
    # (protocol, blocks) -> host -> ports: hosts asked the same things...
    ports_of: dict[tuple[str, frozenset[_Block]], dict[str, set[int]]] = defaultdict(
        lambda: defaultdict(set)
    )
    for (host, protocol, port), pairs in seen.items():
        ports_of[(protocol, _blocks(pairs))][host].add(port)
    # ...then on the same ports share a rule: every host x port of it was seen.
    groups: dict[tuple[str, frozenset[_Block], tuple[int, ...]], set[str]] = defaultdict(set)
    for (protocol, blocks), by_host in ports_of.items():
        for host, host_ports in by_host.items():
            groups[(protocol, blocks, tuple(sorted(host_ports)))].add(host)
    out: list[tuple[str, dict[str, Any]]] = []
    for (protocol, blocks, ports), hosts in sorted(
        groups.items(), key=lambda g: (g[0][0], g[0][2], sorted(g[1]))
    ):
        chosen = _wildcard(hosts) if wildcards else sorted(hosts)
        common: dict[str, Any] = {
            "accounts": [account], "hosts": chosen, "ports": ports, "protocols": [protocol]
        }
        if protocol != "HTTP":
            out.append(("", common))
            continue
        for methods, exact, prefix in sorted(blocks):
            note = (
                f"narrowed: {prefix} is the longest prefix of the {MAX_PATHS}+ paths seen; "
                "it also allows other paths under it"
                if prefix
                else ""
            )
            out.append(
                (
                    note,
                    {
                        **common,
                        "methods": methods,
                        "paths": [prefix] if prefix else [],
                        "exact_paths": exact,
                    },
                )
            )
    return out
