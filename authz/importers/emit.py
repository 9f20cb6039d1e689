"""Drafts -> policy ConfigMaps that `lint` accepts, and the report of every source element.

Every host and every rule is validated with the policy parser itself, so a
rule the service would refuse (a host our dialect cannot hold, a public
suffix wildcard, a bad label) is dropped here and reported, never written.
A deny we cannot write takes its overlap away from the allows instead
(common.narrow_by_denials), so dropping it never widens.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..hosts import DEFAULT_CLUSTER_DOMAIN
from ..loader import LoadResult, load_objects
from ..model import POLICY_DATA_KEY, POLICY_LABEL, TIER_CLUSTER, TIER_LABEL, ConfigMapRef, Tier
from ..policy import PolicyError, parse_policy_yaml
from .common import (
    CLUSTER,
    NAMESPACE_NAME,
    DraftDeny,
    DraftRule,
    Note,
    Outcome,
    Translation,
    canonical,
    narrow_by_denials,
    one_line,
    shown,
    wildcard_over_tld,
)

IMPORTED_BY_ANNOTATION = "egress-authz.io/imported-from"


@dataclass
class ImportResult:
    configmaps: list[dict[str, Any]] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    @property
    def lossy(self) -> bool:
        """Something was narrowed or not translated: the exit status says so."""
        return any(n.outcome is not Outcome.EXACT for n in self.notes)

    def counts(self) -> dict[str, int]:
        out = {o.value: 0 for o in Outcome}
        for n in self.notes:
            out[n.outcome.value] += 1
        return out


def _problem(text: str, where: ConfigMapRef, tier: Tier,
             cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str | None:
    try:
        parse_policy_yaml(text, where, tier=tier, cluster_domain=cluster_domain)
    except PolicyError as e:
        return "; ".join(p.split(": ", 1)[-1] for p in e.problems)
    return None


def _rule_dict(rule: DraftRule, hosts: list[str], name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if rule.workloads:
        out["workloads"] = rule.workloads
    out["hosts"] = hosts
    out["ports"] = sorted(set(rule.ports))
    if rule.protocols is not None:
        out["protocols"] = sorted(set(rule.protocols), reverse=True)  # TLS before HTTP
    if rule.methods:
        out["http"] = {"methods": sorted(set(rule.methods))}
    return out


def _host_problem(raw: str, where: ConfigMapRef, tier: Tier, cluster_domain: str) -> str | None:
    pattern = canonical(raw) or raw
    if wildcard_over_tld(pattern):
        return f"{pattern} would allow a whole top-level domain"
    if "." not in pattern:
        return f"{pattern} is a single label (a top-level domain), not a host"
    one = yaml.safe_dump({"rules": [{"name": "check", "hosts": [pattern], "ports": [443]}]})
    problem = _problem(one, where, tier, cluster_domain)
    return f"not valid in egress-authz: {problem}" if problem else None


def _validate_rule(rule: DraftRule, cluster_namespace: str, cluster_domain: str) -> None:
    """Move every host the parser refuses into `rule.dropped`; refuse the rule if need be."""
    tier = Tier.CLUSTER if rule.namespace == CLUSTER else Tier.NAMESPACE
    where = ConfigMapRef(rule.namespace or cluster_namespace, rule.configmap)
    if rule.namespace != CLUSTER and not NAMESPACE_NAME.match(rule.namespace):
        for raw in rule.hosts:
            rule.dropped.setdefault(raw, f"namespace {shown(rule.namespace)} is not a valid name")
        return
    problems = {raw: _host_problem(raw, where, tier, cluster_domain) for raw in rule.hosts}
    for raw, problem in problems.items():
        if problem and raw not in rule.dropped:
            rule.dropped[raw] = problem
        # `.co.uk` in Squid or AWS is `co.uk` plus `*.co.uk`: when the parser refuses
        # the wildcard (a public suffix), the bare suffix is no host to allow either.
        apex = raw[2:] if raw.startswith("*.") else None
        if problem and apex in problems and apex not in rule.dropped:
            rule.dropped[apex] = f"the apex of {raw}, which is refused: {problem}"
    seen = list(dict.fromkeys(canonical(r) or r for r in rule.hosts if r not in rule.dropped))
    if not seen:
        return
    problem = _problem(yaml.safe_dump({"rules": [_rule_dict(rule, seen, "check")]}), where, tier,
                       cluster_domain)
    if problem:
        for raw in rule.hosts:
            rule.dropped.setdefault(raw, f"the rule is not valid in egress-authz: {problem}")


def _validate_deny(deny: DraftDeny, cluster_namespace: str) -> list[str]:
    """Refuse deny hosts the parser refuses; return the refused regions (raw patterns)."""
    where = ConfigMapRef(cluster_namespace, deny.configmap)
    refused = []
    for raw in deny.hosts:
        problem = _problem(yaml.safe_dump({"deny": [raw]}), where, Tier.CLUSTER)
        if problem:
            deny.dropped[raw] = f"not valid in egress-authz: {problem}"
            refused.append(raw.lower())
    return refused


def _kept(draft: DraftRule | DraftDeny, pattern: str) -> bool:
    return pattern not in draft.dropped


def _regrade(notes: Iterable[Note], refs: dict[int, str]) -> None:
    """A note whose hosts were all refused is not translated; some refused: narrower."""
    for note in notes:
        if not note.targets:
            continue
        survivors = [(d, p) for d, p in note.targets if _kept(d, p)]
        lost = [(d, p) for d, p in note.targets if not _kept(d, p)]
        note.rules = sorted({refs[id(d)] for d, _ in survivors if id(d) in refs})
        if not lost:
            continue
        why = "; ".join(sorted({f"{p}: {d.dropped[p]}" for d, p in lost}))
        if not survivors:
            note.outcome = Outcome.DROPPED
            note.reason = f"{note.reason}; {why}" if note.reason else why
        else:
            note.outcome = Outcome.NARROWER
            note.reason = f"{note.reason}; {why}" if note.reason else why


def _comment(lines: Iterable[str], indent: str) -> str:
    return "".join(f"{indent}# {one_line(line)}\n" for line in lines)


def _note_line(note: Note) -> str:
    text = f"{note.outcome.value}: {note.element}"
    return f"{text}: {note.reason}" if note.reason else text


def build(
    translation: Translation,
    *,
    source: str,
    origin: str,
    cluster_namespace: str,
    mode: str | None = None,
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN,
) -> ImportResult:
    """Validate the drafts and lay them out as ConfigMaps, one per (namespace, name)."""
    refused = []
    for deny in translation.denies:
        refused.extend(_validate_deny(deny, cluster_namespace))
    narrow_by_denials(translation, [*translation.unexpressed_denials, *refused])
    for rule in translation.rules:
        _validate_rule(rule, cluster_namespace, cluster_domain)

    groups: dict[tuple[str, str], list[DraftRule | DraftDeny]] = defaultdict(list)
    for rule in translation.rules:
        if any(_kept(rule, p) for p in rule.hosts):
            groups[(rule.namespace, rule.configmap)].append(rule)
    for deny in translation.denies:
        if any(_kept(deny, p) for p in deny.hosts):
            groups[(CLUSTER, deny.configmap)].append(deny)

    # Rule names must be unique within a ConfigMap; refs go into the report.
    refs: dict[int, str] = {}
    names: dict[int, str] = {}
    for (namespace, cm_name), drafts in groups.items():
        used: set[str] = set()
        for d in drafts:
            ns = namespace or cluster_namespace
            if isinstance(d, DraftDeny):
                refs[id(d)] = f"{ns}/{cm_name} deny"
                continue
            name, n = d.name, 2
            while name in used:
                name, n = f"{d.name[:58]}-{n}", n + 1
            used.add(name)
            names[id(d)] = name
            refs[id(d)] = f"{ns}/{cm_name}/{name}"
    _regrade(translation.notes, refs)

    by_draft: dict[int, list[Note]] = defaultdict(list)
    for note in translation.notes:
        for d, _ in note.targets:
            if note not in by_draft[id(d)]:
                by_draft[id(d)].append(note)

    result = ImportResult(notes=list(translation.notes))
    for (namespace, cm_name), drafts in sorted(groups.items()):
        text = (
            f"# Imported by `egress-authz import --from {source}` from {shown(origin)}.\n"
            "# Each rule is preceded by the source elements it came from and what became\n"
            "# of them (exact, narrower, not-translatable); see docs/migrating.md.\n"
        )
        left_out = [
            n for n in translation.notes if n.anchor == (namespace, cm_name) and not n.rules
        ]
        if left_out:
            text += "# Not carried over from this source:\n"
            text += _comment((_note_line(n) for n in left_out), "")
        if mode and namespace != CLUSTER:
            text += f"mode: {mode}\n"
        deny_hosts = [p for d in drafts if isinstance(d, DraftDeny) for p in d.hosts if _kept(d, p)]
        if deny_hosts:
            text += "deny:\n"
            for d in drafts:
                if isinstance(d, DraftDeny):
                    text += _comment((_note_line(n) for n in by_draft[id(d)]), "  ")
            text += "".join(f"  - {json.dumps(h)}\n" for h in dict.fromkeys(deny_hosts))
        rules = [d for d in drafts if isinstance(d, DraftRule)]
        if rules:
            text += "rules:\n"
        for rule in rules:
            kept = list(dict.fromkeys(canonical(p) or p for p in rule.hosts if _kept(rule, p)))
            text += _comment((_note_line(n) for n in by_draft[id(rule)]), "  ")
            body = yaml.safe_dump([_rule_dict(rule, kept, names[id(rule)])], sort_keys=False)
            text += "".join(f"  {line}\n" for line in body.splitlines())
        labels = (
            {TIER_LABEL: TIER_CLUSTER} if namespace == CLUSTER else {POLICY_LABEL: "true"}
        )
        result.configmaps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": cm_name,
                    "namespace": namespace or cluster_namespace,
                    "labels": labels,
                    "annotations": {IMPORTED_BY_ANNOTATION: f"{source}: {shown(origin)}"},
                },
                "data": {POLICY_DATA_KEY: text},
            }
        )
    # The same check `lint` runs: anything we write must load.
    check = LoadResult()
    load_objects(result.configmaps, "import", check, cluster_namespace=cluster_namespace,
                 cluster_domain=cluster_domain)
    if check.problems:  # a bug here, never the user's input: fail loudly
        raise RuntimeError("imported policy does not validate: " + "; ".join(check.problems))
    return result


# --------------------------------------------------------------------------
# Output


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (policy.yaml) as `|` blocks, the way people write them."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_BlockDumper.add_representer(str, _str)


def render(result: ImportResult, output: str) -> str:
    if output == "json":
        listed = {"apiVersion": "v1", "kind": "List", "items": result.configmaps}
        return json.dumps(listed, indent=2)
    docs = [
        yaml.dump(cm, Dumper=_BlockDumper, sort_keys=False, width=1000)
        for cm in result.configmaps
    ]
    return "---\n".join(docs)


def report_lines(result: ImportResult) -> list[str]:
    lines = []
    for note in result.notes:
        line = f"{note.outcome.value:<17} {one_line(note.element)}"
        if note.rules:
            line += f" -> {', '.join(note.rules)}"
        if note.reason:
            line += f"\n{'':<18}{one_line(note.reason)}"
        lines.append(line)
    c = result.counts()
    lines.append(
        f"{c['exact']} exact, {c['narrower']} narrower, {c['not-translatable']} not translatable; "
        f"{len(result.configmaps)} ConfigMap(s)"
    )
    return lines
