"""GKE FQDNNetworkPolicy -> our rules.

GKE's documented matching (https://cloud.google.com/kubernetes-engine/docs/how-to/fqdn-network-policies):
`matches[].name` is one exact name; `matches[].pattern` uses `*`, and
`*.company.com` matches `api.company.com` or `store.company.com`, but not
`eu.api.company.com` nor `company.com`: the `*` is one label. Ours matches
any depth, so a pattern with `*` has no narrower equivalent and is not
translated; a pattern without `*` is a name. The open-source controller's
schema (`networking.gke.io/v1alpha3`, `egress[].to[].fqdns[]`,
GoogleCloudPlatform/gke-fqdnnetworkpolicies-golang) lists exact names only.
The subject is `spec.podSelector` in the policy's namespace.
"""

from __future__ import annotations

from typing import Any

from .common import (
    DEFAULT_HTTP_PORT,
    DEFAULT_TLS_PORT,
    DraftRule,
    Outcome,
    Translation,
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

KIND = "FQDNNetworkPolicy"


def k8s_ports(
    raw_ports: list[Any], where: str, t: Translation, anchor: tuple[str, str]
) -> tuple[list[int], str] | None:
    """NetworkPolicy-style ports -> (ports, narrowing) or None when none can be carried."""
    if not raw_ports:
        return [DEFAULT_TLS_PORT, DEFAULT_HTTP_PORT], (
            f"no ports (every port) is imported as ports {DEFAULT_TLS_PORT} and {DEFAULT_HTTP_PORT}"
        )
    ports: list[int] = []
    narrowed = False
    for j, port in enumerate(raw_ports):
        port = as_map(port)
        proto = str(port.get("protocol") or "TCP").upper()
        value = port.get("port")
        if proto != "TCP":
            t.note(f"{where} ports[{j}]", Outcome.DROPPED,
                   f"protocol {shown(proto)}: the egress gateway carries TCP only", anchor)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
            t.note(f"{where} ports[{j}]", Outcome.DROPPED,
                   f"port {shown(value)} is not a port number", anchor)
            continue
        end = port.get("endPort")
        end = end if isinstance(end, int) and not isinstance(end, bool) and end >= value else value
        listed, wide = port_list(value, min(end, 65535))
        narrowed = narrowed or wide
        ports.extend(listed)
    if not ports:
        return None
    return sorted(set(ports)), ("a wide port range is imported as the common ports in it"
                                if narrowed else "")


def name_or_pattern(match: dict[str, Any]) -> tuple[str | None, str, str]:
    """(our pattern or None, element text, why not)."""
    if "name" in match:
        return str(match["name"]).lower().rstrip("."), f'name "{shown(match["name"])}"', ""
    if "pattern" in match:
        raw = str(match["pattern"])
        element = f'pattern "{shown(raw)}"'
        if "*" not in raw:
            return raw.lower().rstrip("."), element, ""
        return None, element, (
            "GKE's '*' is exactly one label (*.x matches a.x, not a.b.x); egress-authz's '*.x' "
            "also matches deeper names, which would widen it: list the names you need with name:"
        )
    return None, shown(match), "neither name nor pattern"


def translate(paths: list[str], options: Any) -> Translation:
    t = Translation()
    for obj in objects_of_kind(t, documents(paths), (KIND,), f"not a {KIND}"):
        meta, spec = as_map(obj.get("metadata")), as_map(obj.get("spec"))
        name = str(meta.get("name") or "unnamed")
        ns = str(meta.get("namespace") or options.namespace or "default")
        where0 = f"{ns}/{name}"
        cm = configmap_name("gke", name)
        anchor = (ns, cm)
        if spec.get("ingress"):
            t.note(f"{where0} ingress", Outcome.DROPPED,
                   "ingress rules: egress-authz decides egress only", anchor)
        workloads, problem = workloads_from_selector(spec.get("podSelector"))
        if "podSelector" not in spec:  # required by the API: an object without it never applied
            problem = "no podSelector"
        egress = as_list(spec.get("egress"))
        for j, rule in enumerate(egress):
            rule = as_map(rule)
            where = f"{where0} egress[{j}]"
            matches = [
                (f"matches[{i}]", as_map(m)) for i, m in enumerate(as_list(rule.get("matches")))
            ]
            for k, peer in enumerate(as_list(rule.get("to"))):
                peer = as_map(peer)
                for i, fqdn in enumerate(as_list(peer.get("fqdns"))):
                    matches.append((f"to[{k}].fqdns[{i}]", {"name": fqdn}))
                for other in set(peer) - {"fqdns"}:
                    t.note(f"{where} to[{k}] {shown(other)}", Outcome.DROPPED,
                           "not a host name", anchor)
            if problem:
                t.note(where, Outcome.DROPPED, f"podSelector not carried over: {problem}", anchor)
                continue
            if not matches:
                t.note(where, Outcome.DROPPED, "no names to carry over", anchor)
                continue
            ports = k8s_ports(as_list(rule.get("ports")), where, t, anchor)
            if ports is None:
                for loc, _ in matches:
                    t.note(f"{where} {loc}", Outcome.DROPPED, "none of its ports is TCP", anchor)
                continue
            draft = DraftRule(ns, cm, rule_name(name, f"egress{j}"), [], ports[0], None, workloads)
            t.rules.append(draft)
            for loc, match in matches:
                ours, element, why = name_or_pattern(match)
                if ours is None:
                    t.note(f"{where} {loc} {element}", Outcome.DROPPED, why, anchor)
                    continue
                note = t.note(f"{where} {loc} {element}",
                              Outcome.NARROWER if ports[1] else Outcome.EXACT, ports[1], anchor)
                t.allow(draft, ours, note)
        if not egress:
            t.note(where0, Outcome.DROPPED, "no egress rules", anchor)
    return t
