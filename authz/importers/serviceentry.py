"""Istio ServiceEntries written by hand -> our rules.

Istio's documented matching (https://istio.io/latest/docs/reference/config/networking/service-entry/,
`hosts`): a name, or a wildcard prefix `*.example.com` matching any name
below it at any depth; ours is the same dialect, so hosts carry over
exactly. With `outboundTrafficPolicy: REGISTRY_ONLY`, a namespace reaches a
host only through a ServiceEntry exported to it:
- `exportTo: ["*"]` -> every namespace: the cluster tier;
- `exportTo: ["."]` or the entry's own namespace -> that namespace;
- other names -> one policy in each; `~` -> nobody;
- no `exportTo` -> Istio's mesh default, which may be every namespace or
  only its own (`defaultServiceExportTo`): we take its own namespace, the
  narrower reading, and say so.
Ports: HTTPS/TLS -> TLS; HTTP/HTTP2/GRPC -> HTTP; TCP and others -> TLS
only (the gateway sees no host name in plain TCP: narrower).
`location: MESH_INTERNAL` entries are not external hosts. Entries written by
egress-authz itself (label app.kubernetes.io/managed-by) are skipped.
"""

from __future__ import annotations

from typing import Any

from ..model import MANAGED_BY_LABEL, MANAGED_BY_VALUE
from .common import (
    CLUSTER,
    DraftRule,
    Outcome,
    Translation,
    as_list,
    as_map,
    configmap_name,
    objects_of_kind,
    rule_name,
    shown,
)
from .inputs import documents

KIND = "ServiceEntry"
TLS_PROTOCOLS = ("HTTPS", "TLS")
HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "GRPC-WEB")


def export_targets(export_to: Any, own: str) -> tuple[list[str], str]:
    """Namespaces (CLUSTER for every one) that see the entry, and why narrower."""
    if export_to is None:
        return [own], ("no exportTo: the mesh default may export it to every namespace; "
                       f"imported for its own namespace {own} only")
    out: list[str] = []
    for item in as_list(export_to):
        item = str(item)
        if item == "*":
            return [CLUSTER], ""
        if item == ".":
            out.append(own)
        elif item != "~":
            out.append(item)
    return sorted(set(out)), ""


def translate(paths: list[str], options: Any) -> Translation:
    t = Translation()
    for obj in objects_of_kind(t, documents(paths), (KIND,), f"not a {KIND}"):
        meta, spec = as_map(obj.get("metadata")), as_map(obj.get("spec"))
        name = str(meta.get("name") or "unnamed")
        own = str(meta.get("namespace") or options.namespace or "default")
        where = f"{own}/{name}"
        if as_map(meta.get("labels")).get(MANAGED_BY_LABEL) == MANAGED_BY_VALUE:
            t.note(where, Outcome.DROPPED, "written by egress-authz itself: import the policy "
                   "ConfigMaps instead")
            continue
        if spec.get("location") == "MESH_INTERNAL":
            t.note(where, Outcome.DROPPED, "location MESH_INTERNAL: not an external host")
            continue
        targets, export_why = export_targets(spec.get("exportTo"), own)
        tls, http, narrowing = [], [], [export_why] if export_why else []
        for i, port in enumerate(as_list(spec.get("ports"))):
            port = as_map(port)
            number, proto = port.get("number"), str(port.get("protocol") or "TCP").upper()
            if isinstance(number, bool) or not isinstance(number, int) or not 0 < number <= 65535:
                t.note(f"{where} ports[{i}]", Outcome.DROPPED, f"{shown(number)} is not a port")
                continue
            if proto in HTTP_PROTOCOLS:
                http.append(number)
            elif proto in TLS_PROTOCOLS:
                tls.append(number)
            elif proto == "UDP":
                t.note(f"{where} ports[{i}]", Outcome.DROPPED, "UDP: the gateway carries TCP only")
            else:
                tls.append(number)
                narrowing.append(f"port {number} {shown(proto)} is imported as TLS only")
        hosts = [str(h) for h in as_list(spec.get("hosts"))]
        if not targets or not (tls or http):
            for h in hosts:
                t.note(f'{where} host "{shown(h)}"', Outcome.DROPPED,
                       "exported to no namespace" if not targets else "no TCP port")
            continue
        cm = configmap_name("serviceentry", name)
        drafts = []
        for ns in targets:
            if tls:
                drafts.append(DraftRule(ns, cm, rule_name(name, "tls"), [], tls, ["TLS"]))
            if http:
                drafts.append(DraftRule(ns, cm, rule_name(name, "http"), [], http, ["HTTP"]))
        t.rules.extend(drafts)
        for h in hosts:
            note = t.note(f'{where} host "{shown(h)}"',
                          Outcome.NARROWER if narrowing else Outcome.EXACT,
                          "; ".join(narrowing), (targets[0], cm))
            for draft in drafts:
                t.allow(draft, h.lower().rstrip("."), note)
    return t
