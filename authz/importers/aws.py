"""AWS Network Firewall domain-list rule groups (RulesSourceList) -> our rules.

AWS's documented matching (AWS::NetworkFirewall::RuleGroup RulesSourceList,
https://docs.aws.amazon.com/AWSCloudFormation/latest/UserGuide/aws-properties-networkfirewall-rulegroup-rulessourcelist.html):
`abc.example.com` matches only that name; `.example.com` matches
`example.com` and all its subdomains, so it becomes `example.com` plus
`*.example.com`. `TargetTypes` TLS_SNI inspects the TLS SNI (our TLS), and
HTTP_HOST the Host header (our HTTP). `GeneratedRulesType` ALLOWLIST allows
the targets, DENYLIST denies them: deny lists go to the cluster tier's `deny`,
which beats every allow (stricter than AWS's default action order, where
pass rules win).

AWS inspects those protocols on any port; we write the usual ports (443 for
TLS, 80 for HTTP), which is narrower. AWS matches traffic by VPC address
(HOME_NET), not by workload: the allows go to `--namespace`, or to the
cluster tier (every workload) without it, and the report says so.

Accepted input: `aws network-firewall describe-rule-group` JSON, a
CloudFormation template or resource, or a bare RulesSourceList; every
RulesSourceList found in the document is imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import (
    CLUSTER,
    DEFAULT_HTTP_PORT,
    DEFAULT_TLS_PORT,
    DraftDeny,
    DraftRule,
    Outcome,
    Translation,
    as_list,
    as_map,
    configmap_name,
    rule_name,
    shown,
)
from .inputs import documents

MAX_DEPTH = 12
PROTOCOLS = {"TLS_SNI": ("TLS", DEFAULT_TLS_PORT), "HTTP_HOST": ("HTTP", DEFAULT_HTTP_PORT)}


def target_patterns(target: str) -> list[str]:
    t = target.strip().lower().rstrip(".")
    if t.startswith("."):
        return [t[1:], "*" + t]
    return [t]


def _find(obj: Any, name: str, path: str, depth: int = 0) -> Iterator[tuple[str, str, Any]]:
    """(group name, path, RulesSourceList) for every list in a document."""
    if depth > MAX_DEPTH:
        return
    if isinstance(obj, dict):
        name = str(obj.get("RuleGroupName") or name)
        for key, value in obj.items():
            if key == "RulesSourceList":
                yield name, f"{path}.RulesSourceList".lstrip("."), value
            elif key == "Resources" and isinstance(value, dict):
                for rid, res in value.items():
                    yield from _find(res, str(rid), f"{path}.Resources.{rid}", depth + 1)
            elif key == "RuleGroupResponse" and isinstance(value, dict):
                continue
            else:
                yield from _find(value, name, f"{path}.{key}", depth + 1)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _find(item, name, f"{path}[{i}]", depth + 1)


def _group_name(doc_obj: Any, default: str) -> str:
    response = as_map(as_map(doc_obj).get("RuleGroupResponse"))
    return str(response.get("RuleGroupName") or default)


def translate(paths: list[str], options: Any) -> Translation:
    t = Translation()
    ns = options.namespace or CLUSTER
    who = (f"every workload of namespace {ns}" if ns else
           "every workload of every namespace (the cluster tier)")
    for doc in documents(paths):
        top = _group_name(doc.obj, Path(doc.origin.split("#")[0]).stem)
        if isinstance(doc.obj, dict) and {"Targets", "GeneratedRulesType"} <= set(doc.obj):
            found = [(top, "RulesSourceList", doc.obj)]
        else:
            found = list(_find(doc.obj, top, ""))
        if not found:
            t.note(doc.origin, Outcome.DROPPED, "no RulesSourceList (domain list) in it; "
                   "Suricata-compatible and 5-tuple rule groups are not translated")
        for group, path, raw in found:
            rsl = as_map(raw)
            where = f"{group} {path}"
            kind = str(rsl.get("GeneratedRulesType"))
            types = [str(x) for x in as_list(rsl.get("TargetTypes"))]
            targets = [x for x in as_list(rsl.get("Targets")) if isinstance(x, str)]
            cm = configmap_name("aws-nfw", group)
            for bad in [x for x in types if x not in PROTOCOLS]:
                t.note(f"{where} TargetTypes {shown(bad)}", Outcome.DROPPED,
                       "only TLS_SNI and HTTP_HOST are domain-list target types")
            types = [x for x in types if x in PROTOCOLS]
            if kind == "DENYLIST":
                deny = DraftDeny(cm, [])
                t.denies.append(deny)
                for target in targets:
                    note = t.note(f'{where} DENYLIST "{shown(target)}"', Outcome.EXACT,
                                  "cluster tier deny, for TLS and HTTP alike", (CLUSTER, cm))
                    for p in target_patterns(target):
                        t.deny(deny, p, note)
                continue
            if kind != "ALLOWLIST":
                for target in targets:
                    t.note(f'{where} {shown(kind)} "{shown(target)}"', Outcome.DROPPED,
                           "GeneratedRulesType must be ALLOWLIST or DENYLIST")
                continue
            if not types:
                for target in targets:
                    t.note(f'{where} ALLOWLIST "{shown(target)}"', Outcome.DROPPED,
                           "no TargetTypes we can carry (TLS_SNI, HTTP_HOST)")
                continue
            drafts = []
            for target_type in types:
                proto, port = PROTOCOLS[target_type]
                drafts.append(
                    DraftRule(ns, cm, rule_name(group, proto.lower()), [], [port], [proto])
                )
            t.rules.extend(drafts)
            ports = " and ".join(f"{PROTOCOLS[x][0]} on {PROTOCOLS[x][1]}" for x in types)
            for target in targets:
                note = t.note(
                    f'{where} ALLOWLIST "{shown(target)}"',
                    Outcome.NARROWER,
                    f"AWS inspects any port; imported as {ports}; applies to {who}",
                    (ns, cm),
                )
                for draft in drafts:
                    for p in target_patterns(target):
                        t.allow(draft, p, note)
    return t
