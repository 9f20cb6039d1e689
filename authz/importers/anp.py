"""Kubernetes AdminNetworkPolicy (policy.networking.k8s.io, NPEP-133 `domainNames`) -> our rules.

The API's documented matching (kubernetes-sigs/network-policy-api,
apis/v1alpha1 `DomainName`; https://network-policy-api.sigs.k8s.io/npeps/npep-133-fqdn-egress-selector/):
`kubernetes.io` matches only that name; `*.kubernetes.io` matches one or more
labels below it, never `kubernetes.io` itself: the same as ours, so names
and wildcards carry over exactly.

Order matters in ANP and not in ours: rules are checked by `priority` (lower
first), then in the order written, and the first match decides (Allow, Deny,
or Pass to NetworkPolicy). An Allow is kept only where no Deny or Pass that
comes before it (or shares its priority in another policy, where the order is
undefined) could match first: overlapping host patterns are dropped, and a
Deny/Pass to `networks` or `nodes` (addresses any name may resolve to)
overlaps every name. Deny `domainNames` go to the cluster tier's `deny`.

Subjects: `namespaces` / `pods.namespaceSelector` select namespaces. An empty
selector is every namespace: the cluster tier. A selector on
`kubernetes.io/metadata.name` names them. Any other selector is evaluated
against the Namespace objects given with the input (narrower: namespaces
labelled later are not covered); without them it is not translated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .common import (
    CLUSTER,
    DEFAULT_HTTP_PORT,
    DEFAULT_TLS_PORT,
    DraftDeny,
    DraftRule,
    Outcome,
    Translation,
    as_int,
    as_list,
    as_map,
    configmap_name,
    objects_of_kind,
    overlaps,
    port_list,
    rule_name,
    selector_matches,
    shown,
    workloads_from_selector,
)
from .inputs import documents

KINDS = ("AdminNetworkPolicy", "BaselineAdminNetworkPolicy")
NAME_LABEL = "kubernetes.io/metadata.name"
ADDRESS_PEERS = ("networks", "nodes")


@dataclass
class _Rule:
    policy: str
    priority: int
    index: int
    action: str
    domains: list[str]  # our patterns
    address_peer: bool  # a networks/nodes peer: any name may resolve into it
    ports: list[int] | None  # None = every port
    namespaces: list[str] | None  # None = every namespace (cluster tier)
    where: str


def resolve_namespaces(
    selector: Any, known: dict[str, dict[str, str]]
) -> tuple[list[str] | None, str, bool]:
    """(namespaces or None for all, problem, narrowed)."""
    sel = as_map(selector)
    if not sel.get("matchLabels") and not sel.get("matchExpressions"):
        return None, "", False
    labels = as_map(sel.get("matchLabels"))
    exprs = as_list(sel.get("matchExpressions"))
    if set(labels) <= {NAME_LABEL} and all(
        as_map(e).get("key") == NAME_LABEL and as_map(e).get("operator") == "In" for e in exprs
    ):
        names: set[str] | None = {str(labels[NAME_LABEL])} if NAME_LABEL in labels else None
        for e in exprs:
            values = {str(v) for v in as_list(as_map(e).get("values"))}
            names = values if names is None else names & values
        return sorted(names or ()), "", False
    if not known:
        return [], (
            f"namespace selector {shown(sel)} needs the Namespace objects: add "
            "`kubectl get namespaces -o yaml` to the input"
        ), False
    return sorted(n for n, lbl in known.items() if selector_matches(sel, lbl)), "", True


def _ports(raw: Any) -> tuple[list[int] | None, str]:
    if raw is None:
        return None, ""
    ports: list[int] = []
    why = ""
    for p in as_list(raw):
        p = as_map(p)
        if "portNumber" in p:
            number = as_map(p["portNumber"])
            if str(number.get("protocol") or "TCP").upper() == "TCP":
                ports.append(as_int(number.get("port")))
        elif "portRange" in p:
            rng = as_map(p["portRange"])
            if str(rng.get("protocol") or "TCP").upper() == "TCP":
                start, end = as_int(rng.get("start")), as_int(rng.get("end"))
                if not 0 < start <= end <= 65535:
                    why = why or "a port range that is not one"
                    continue
                listed, wide = port_list(start, end)
                ports.extend(listed)
                why = "a wide port range is imported as the common ports in it" if wide else why
        elif "port" in p and str(p.get("protocol") or "TCP").upper() == "TCP":
            ports.append(as_int(p["port"]))  # the pre-2024 v1alpha1 shape
        else:
            why = why or "named ports and non-TCP ports are not carried over"
    return [p for p in ports if 0 < p <= 65535], why


def translate(paths: list[str], options: Any) -> Translation:
    t = Translation()
    docs = list(documents(paths))
    known = {
        str(as_map(d.obj.get("metadata")).get("name")): {
            str(k): str(v) for k, v in as_map(as_map(d.obj.get("metadata")).get("labels")).items()
        }
        for d in docs
        if isinstance(d.obj, dict) and d.obj.get("kind") == "Namespace"
    }
    for name in known:
        known[name].setdefault(NAME_LABEL, name)
    rules: list[_Rule] = []
    subjects: dict[str, tuple[list[str] | None, dict[str, Any] | None, str, bool]] = {}
    policies = [d for d in docs if as_map(d.obj).get("kind") != "Namespace"]  # read above
    for obj in objects_of_kind(t, policies, KINDS, "not an AdminNetworkPolicy"):
        kind = obj.get("kind")
        meta, spec = as_map(obj.get("metadata")), as_map(obj.get("spec"))
        pname = str(meta.get("name") or "unnamed")
        label = f"{kind} {pname}"
        if spec.get("ingress"):
            t.note(f"{label} ingress", Outcome.DROPPED, "ingress rules: egress-authz decides "
                   "egress only")
        subject = as_map(spec.get("subject"))
        if "pods" in subject:
            pods = as_map(subject["pods"])
            ns_sel, pod_sel = pods.get("namespaceSelector"), pods.get("podSelector")
        else:
            ns_sel, pod_sel = subject.get("namespaces"), None
        namespaces, problem, narrowed = resolve_namespaces(ns_sel, known)
        workloads, wproblem = workloads_from_selector(pod_sel)
        subjects[pname] = (namespaces, workloads, problem or wproblem, narrowed)
        # Baseline policies come after NetworkPolicy: last of all.
        baseline = kind == "BaselineAdminNetworkPolicy"
        priority = 10_000 if baseline else as_int(spec.get("priority"))
        for i, raw in enumerate(as_list(spec.get("egress"))):
            raw = as_map(raw)
            where = f"{label} egress[{i}]" + (f' "{shown(raw["name"])}"' if raw.get("name") else "")
            domains: list[str] = []
            address = False
            for k, peer in enumerate(as_list(raw.get("to"))):
                peer = as_map(peer)
                for d in as_list(peer.get("domainNames")):
                    domains.append(str(d).lower().rstrip("."))
                if any(p in peer for p in ADDRESS_PEERS):
                    address = True
                others = set(peer) - {"domainNames"}
                if others:
                    t.note(f"{where} to[{k}] {', '.join(sorted(others))}", Outcome.DROPPED,
                           "egress-authz decides by host name; pods, namespaces, nodes and "
                           "networks are not translated")
            ports, why = _ports(raw.get("ports"))
            if why:
                t.note(f"{where} ports", Outcome.NARROWER, why)
            rules.append(_Rule(pname, priority, i, str(raw.get("action")), domains, address,
                               ports, namespaces, where))

    def preempts(p: _Rule, r: _Rule) -> bool:
        if p.action not in ("Deny", "Pass") or p is r:
            return False
        before = p.priority < r.priority or (
            p.priority == r.priority and (p.policy != r.policy or p.index < r.index)
        )
        if not before:
            return False
        if p.ports is not None and r.ports is not None and not set(p.ports) & set(r.ports):
            return False
        return not (
            p.namespaces is not None and r.namespaces is not None
            and not set(p.namespaces) & set(r.namespaces)
        )

    for r in rules:
        namespaces, workloads, problem, narrowed = subjects[r.policy]
        if not r.domains:
            continue
        if r.action == "Deny":
            deny = DraftDeny(configmap_name("k8s-anp", r.policy), [])
            t.denies.append(deny)
            for d in r.domains:
                note = t.note(f'{r.where} domainNames "{shown(d)}" (Deny)', Outcome.EXACT,
                              "cluster tier deny: it beats every allow, whatever the ANP order")
                t.deny(deny, d, note)
            continue
        if r.priority >= 10_000:  # BaselineAdminNetworkPolicy
            for d in r.domains:
                t.note(f'{r.where} domainNames "{shown(d)}"', Outcome.DROPPED,
                       "a baseline rule: NetworkPolicies decide before it, so it cannot be "
                       "carried over as an allow (the API keeps domainNames to the Admin tier)")
            continue
        if r.action != "Allow":
            for d in r.domains:
                t.note(f'{r.where} domainNames "{shown(d)}" ({shown(r.action)})', Outcome.DROPPED,
                       "Pass hands the decision to NetworkPolicy, which names no hosts; later "
                       "allows that overlap it are dropped")
            continue
        if problem:
            for d in r.domains:
                t.note(f'{r.where} domainNames "{shown(d)}"', Outcome.DROPPED,
                       f"subject not carried over: {problem}")
            continue
        ports = r.ports if r.ports is not None else [DEFAULT_TLS_PORT, DEFAULT_HTTP_PORT]
        reasons = []
        if r.ports is None:
            reasons.append(f"no ports (every port) is imported as ports {DEFAULT_TLS_PORT} and "
                           f"{DEFAULT_HTTP_PORT}")
        if narrowed:
            reasons.append(f"namespace selector evaluated against the {len(known)} Namespace "
                           "object(s) given: namespaces labelled later are not covered")
        targets = [CLUSTER] if namespaces is None else namespaces
        drafts = [
            DraftRule(ns, configmap_name("k8s-anp", r.policy),
                      rule_name(r.policy, f"egress{r.index}"), [], ports, None, workloads)
            for ns in targets
        ]
        t.rules.extend(drafts)
        earlier = [p for p in rules if preempts(p, r)]
        for d in r.domains:
            element = f'{r.where} domainNames "{shown(d)}"'
            hit = next(
                (p for p in earlier if p.address_peer or any(overlaps(x, d) for x in p.domains)),
                None,
            )
            if hit is not None:
                why = (f"{hit.where} ({hit.action}) comes first and may match it"
                       + (" (its networks/nodes may hold any name's addresses)"
                          if hit.address_peer else ""))
                anchor = (drafts[0].namespace, drafts[0].configmap) if drafts else None
                t.note(element, Outcome.DROPPED, why, anchor)
                continue
            if not drafts:
                t.note(element, Outcome.DROPPED, "its namespace selector matches no namespace")
                continue
            note = t.note(element, Outcome.NARROWER if reasons else Outcome.EXACT,
                          "; ".join(reasons))
            for draft in drafts:
                t.allow(draft, d, note)
    return t
