"""CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy `toFQDNs` -> our rules.

Cilium's documented matching (https://docs.cilium.io/en/stable/security/policy/language/#dns-based,
"DNS based"; `**.` from the Cilium 1.19 upgrade notes):
- `matchName` matches exactly that name.
- `matchPattern`: `*` alone matches every name; `*` inside a pattern matches
  zero or more DNS characters *within one label* (`*.cilium.io` matches
  `sub.cilium.io`, not `cilium.io` nor `sub.sub.cilium.io`); a `**.` prefix
  matches every subdomain at any depth (`**.cilium.io`: `app.cilium.io`,
  `test.app.cilium.io`, not `cilium.io`).
Ours: `*.x` is any depth, apex excluded. So `**.x` is exactly `*.x`, a name
is a name, and every other pattern (a one-label `*`, a partial label, `*`
alone) has no narrower equivalent: it is not translated and the report says
how to write it. Before Cilium 1.19, `**.` matched one label only; the report
reminds of that.
"""

from __future__ import annotations

from typing import Any

from .common import (
    CLUSTER,
    DEFAULT_HTTP_PORT,
    DEFAULT_TLS_PORT,
    DraftRule,
    Outcome,
    Translation,
    as_int,
    as_list,
    as_map,
    configmap_name,
    objects_of_kind,
    port_list,
    rule_name,
    shown,
    workloads_from_selector,
)
from .inputs import documents

KINDS = ("CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy")
NAMESPACE_KEY = "io.kubernetes.pod.namespace"
ACCOUNT_KEY = "io.cilium.k8s.policy.serviceaccount"
_PREFIXES = ("k8s:", "any:")
_OTHER_PEERS = (
    "toEndpoints",
    "toCIDR",
    "toCIDRSet",
    "toEntities",
    "toServices",
    "toGroups",
    "toNodes",
    "toRequires",
    "icmps",
)


def pattern_to_ours(pattern: str) -> tuple[str | None, str]:
    """Our pattern for a matchPattern, or None and why not."""
    p = pattern.strip().lower().rstrip(".")
    if p == "*":
        return None, "'*' alone matches every name; egress-authz refuses a bare '*': name the hosts"
    if p.startswith("**.") and "*" not in p[3:]:
        return "*." + p[3:], ""
    if "*" not in p:
        return p, ""
    if p.startswith("*.") and "*" not in p[2:]:
        return None, (
            f"Cilium's '*' stays within one label ({p} matches x.{p[2:]}, not x.y.{p[2:]}); "
            f"egress-authz's {p} also matches deeper names, which would widen it: list the "
            f"names with matchName, or use '**.{p[2:]}' if every depth is meant"
        )
    return None, "a '*' inside a label has no equivalent in egress-authz (only a leftmost '*.')"


def deny_region(pattern: str) -> str:
    """The smallest pattern of ours that contains a Cilium pattern (for denials)."""
    p = pattern.strip().lower().rstrip(".")
    if "*" not in p:
        return p
    labels = p.split(".")
    last = max(i for i, label in enumerate(labels) if "*" in label)
    rest = ".".join(labels[last + 1 :])
    return f"*.{rest}" if rest else "*"


def _subject(
    spec: dict[str, Any], policy_ns: str | None
) -> tuple[str | None, dict[str, Any] | None, str]:
    """(namespace or CLUSTER, workloads, problem) for an endpointSelector."""
    if "nodeSelector" in spec:
        return None, None, "nodeSelector (host policy) selects nodes, not pods"
    sel = spec.get("endpointSelector")
    if not isinstance(sel, dict):
        return None, None, "no endpointSelector"
    labels = {str(k): v for k, v in as_map(sel.get("matchLabels")).items()}
    namespace: str | None = policy_ns
    accounts = None
    for key in list(labels):
        bare = next((key[len(p) :] for p in _PREFIXES if key.startswith(p)), key)
        if key.startswith("reserved:"):
            return None, None, f"reserved label {shown(key)} selects no pods we can name"
        if bare == NAMESPACE_KEY:
            value = str(labels.pop(key))
            if policy_ns is not None and value != policy_ns:
                return None, None, f"selects namespace {shown(value)}, not the policy's own"
            namespace = value
        elif bare == ACCOUNT_KEY:
            accounts = [str(labels.pop(key))]
    for expr in as_list(sel.get("matchExpressions")):
        key = str(as_map(expr).get("key", ""))
        if any(k in key for k in (NAMESPACE_KEY, ACCOUNT_KEY, "reserved:")):
            return None, None, f"matchExpressions on {shown(key)} are not carried over"
    workloads, problem = workloads_from_selector(
        {**sel, "matchLabels": labels}, strip_prefixes=_PREFIXES
    )
    if problem:
        return None, None, problem
    if accounts:
        workloads = {"serviceAccounts": accounts, **(workloads or {})}
    return (CLUSTER if namespace is None else namespace), workloads, ""


def _ports(
    to_ports: list[Any], where: str, t: Translation, anchor: tuple[str, str]
) -> list[tuple[list[int], str]]:
    """[(ports, element)] per toPorts entry we can carry; notes for the rest."""
    if not to_ports:
        return [([DEFAULT_TLS_PORT, DEFAULT_HTTP_PORT], "")]
    out = []
    for i, entry in enumerate(to_ports):
        entry = as_map(entry)
        loc = f"{where} toPorts[{i}]"
        rules = as_map(entry.get("rules"))
        if "dns" in rules and len(rules) == 1:
            t.note(loc, Outcome.DROPPED, "a DNS-only rule: egress-authz does not filter DNS",
                   anchor)
            continue
        if rules or entry.get("serverNames") or entry.get("terminatingTLS"):
            t.note(loc, Outcome.DROPPED, "L7 rules (http/kafka/serverNames/TLS) are not carried "
                   "over; without them the rule would allow more", anchor)
            continue
        ports: list[int] = []
        narrowed = False
        for j, port in enumerate(as_list(entry.get("ports"))):
            port = as_map(port)
            proto = str(port.get("protocol") or "ANY").upper()
            raw = str(port.get("port", "0"))
            if proto not in ("TCP", "ANY"):
                t.note(f"{loc} ports[{j}]", Outcome.DROPPED, f"protocol {shown(proto)}: the "
                       "egress gateway carries TCP (TLS and HTTP) only", anchor)
                continue
            if not raw.isdigit() or len(raw) > 5 or int(raw) > 65535:
                t.note(f"{loc} ports[{j}]", Outcome.DROPPED,
                       f"named port {shown(raw)} cannot be resolved for an external host", anchor)
                continue
            start = as_int(raw)
            end = as_int(port.get("endPort"), start) or start
            if start == 0:  # port 0 means every port in Cilium
                start, end = 1, 65535
            listed, wide = port_list(start, min(max(start, end), 65535))
            narrowed = narrowed or wide
            ports.extend(listed)
        if ports:
            out.append((sorted(set(ports)), "ports narrowed to common ones" if narrowed else ""))
        elif not as_list(entry.get("ports")):
            out.append(([DEFAULT_TLS_PORT, DEFAULT_HTTP_PORT], "no ports listed"))
    return out


def _egress(
    t: Translation, rule: dict[str, Any], where: str, ns: str, cm: str, base: str,
    workloads: dict[str, Any] | None,
) -> None:
    anchor = (ns, cm)
    dns_only = all(
        set(as_map(as_map(p).get("rules"))) == {"dns"} for p in as_list(rule.get("toPorts"))
    ) and bool(as_list(rule.get("toPorts")))
    for peer in _OTHER_PEERS:
        if peer in rule:
            why = ("a DNS rule (the resolver and the names it may look up): egress-authz does "
                   "not filter DNS" if dns_only else
                   "egress-authz decides by host name; addresses, entities and in-cluster "
                   "peers are not translated")
            t.note(f"{where} {peer}", Outcome.DROPPED, why, anchor)
    fqdns = as_list(rule.get("toFQDNs"))
    if not fqdns:
        if not any(p in rule for p in _OTHER_PEERS):
            t.note(where, Outcome.DROPPED, "no toFQDNs: nothing names an external host", anchor)
        return
    port_sets = _ports(as_list(rule.get("toPorts")), where, t, anchor)
    if not port_sets:
        for i, sel in enumerate(fqdns):
            t.note(f"{where} toFQDNs[{i}] {shown(sel)}", Outcome.DROPPED,
                   "none of its toPorts can be carried over", anchor)
        return
    drafts = [
        DraftRule(ns, cm, rule_name(base, f"p{k}") if len(port_sets) > 1 else base, [], ports,
                  None, workloads)
        for k, (ports, _) in enumerate(port_sets)
    ]
    t.rules.extend(drafts)
    narrowing = "; ".join(sorted({why for _, why in port_sets if why}))
    if not as_list(rule.get("toPorts")):
        narrowing = (f"no toPorts (every port) is imported as ports {DEFAULT_TLS_PORT} and "
                     f"{DEFAULT_HTTP_PORT}")
    for i, sel in enumerate(fqdns):
        sel = as_map(sel)
        if "matchName" in sel:
            raw, ours, why = sel["matchName"], str(sel["matchName"]).lower().rstrip("."), ""
            element = f'{where} toFQDNs[{i}] matchName "{shown(raw)}"'
        elif "matchPattern" in sel:
            raw = sel["matchPattern"]
            ours, why = pattern_to_ours(str(raw))  # type: ignore[assignment]
            element = f'{where} toFQDNs[{i}] matchPattern "{shown(raw)}"'
        else:
            t.note(f"{where} toFQDNs[{i}]", Outcome.DROPPED, f"neither matchName nor "
                   f"matchPattern: {shown(sel)}", anchor)
            continue
        if ours is None:
            t.note(element, Outcome.DROPPED, why, anchor)
            continue
        reason = narrowing
        if str(raw).strip().startswith("**."):
            extra = "Cilium 1.19+ meaning; before 1.19 '**.' matched one label only"
            reason = f"{reason}; {extra}" if reason else extra
        note = t.note(element, Outcome.NARROWER if narrowing else Outcome.EXACT, reason, anchor)
        for d in drafts:
            t.allow(d, ours, note)


def translate(paths: list[str], options: Any) -> Translation:
    t = Translation()
    for obj in objects_of_kind(t, documents(paths), KINDS,
                               f"not a Cilium policy ({', '.join(KINDS)})"):
        kind = obj.get("kind")
        meta = as_map(obj.get("metadata"))
        name = str(meta.get("name") or "unnamed")
        policy_ns = None
        if kind == "CiliumNetworkPolicy":
            policy_ns = str(meta.get("namespace") or options.namespace or "default")
        label = f"{policy_ns}/{name}" if policy_ns else name
        specs = [obj["spec"]] if isinstance(obj.get("spec"), dict) else []
        specs += [s for s in as_list(obj.get("specs")) if isinstance(s, dict)]
        if not specs:
            t.note(label, Outcome.DROPPED, "no spec")
        for s, spec in enumerate(specs):
            where = label if len(specs) == 1 else f"{label} specs[{s}]"
            for key in ("ingress", "ingressDeny"):
                if spec.get(key):
                    t.note(f"{where} {key}", Outcome.DROPPED,
                           "ingress rules: egress-authz decides egress only")
            for j, rule in enumerate(as_list(spec.get("egressDeny"))):
                rule = as_map(rule)
                fq = as_list(rule.get("toFQDNs"))
                for i, sel in enumerate(fq):
                    sel = as_map(sel)
                    raw = str(sel.get("matchName") or sel.get("matchPattern") or "")
                    region = deny_region(raw)
                    t.unexpressed_denials.append(region)
                    t.note(f"{where} egressDeny[{j}] toFQDNs[{i}] {shown(raw)}", Outcome.NARROWER,
                           f"applied by removing every imported allow that overlaps {region}")
                if not fq:
                    t.note(f"{where} egressDeny[{j}]", Outcome.DROPPED,
                           "an address-based deny cannot be carried over to host names: review "
                           "which names it was meant to block and add them to the cluster deny")
            egress = as_list(spec.get("egress"))
            if not egress:
                continue
            ns, workloads, problem = _subject(spec, policy_ns)
            if ns is None:
                for j, _ in enumerate(egress):
                    t.note(f"{where} egress[{j}]", Outcome.DROPPED,
                           f"endpointSelector not carried over: {problem}")
                continue
            cm = configmap_name("cilium", name)
            for note in t.notes:
                if note.element.startswith(where) and note.anchor is None:
                    note.anchor = (ns, cm)
            for j, rule in enumerate(egress):
                base = rule_name(name, f"egress{j}" if len(specs) == 1 else f"s{s}-egress{j}")
                _egress(t, as_map(rule), f"{where} egress[{j}]", ns, cm, base, workloads)
    return t
