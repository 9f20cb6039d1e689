"""Istio's own rules for the objects we write, the ones CRD schemas cannot express.

tests/schemas.py holds every object to the CRD schemas; this module holds a *set* of
objects to what Istio's webhook and istiod would do with them. Each rule is restated
from Istio's source (istio/istio, read at 1.26-1.29; the file is named at each rule):
the facts carry over, the code does not. `check(objects, ...)` returns every problem
found, as readable strings; an empty list means Istio would accept the objects and a
sidecar in any namespace would route every host it can dial through the egress gateway.

What is modelled, and what is not:
- Visibility by `exportTo` (".", "*", a namespace; empty means "*", the mesh default).
- DestinationRule lookup for the gateway host, as istiod's PushContext.destinationRule
  does it: the proxy's own namespace, then the target Service's namespace (the gateway
  namespace), then the root namespace; the first one that has a rule wins, even if the
  subset the route names is not in it.
- VirtualService order for a sidecar (model.SelectVirtualServices): its own namespace's
  first, then those exported to it, then public ones; the first that names the host is
  the one whose routes count.
- Gateway servers and the VirtualServices bound to them (`ns/name` or a bare name in
  the VirtualService's own namespace), as the gateway proxy selects them
  (PushContext.VirtualServicesForGateway: visible to the gateway's namespace).
Not modelled: Sidecar resources (we write none), workloadSelector DestinationRules, and
the merging of several DestinationRules for one host in one namespace (we never rely on
it, so two of them in one namespace is itself reported).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Obj = Mapping[str, Any]

# pkg/config/labels: IsDNS1123Label (subset names, Gateway names).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


@dataclass(frozen=True)
class Mesh:
    """Where the gateway is, and which namespaces to look from."""

    gateway_namespace: str = "istio-egress"
    gateway_host: str = "istio-egressgateway.istio-egress.svc.cluster.local"
    root_namespace: str = "istio-system"  # meshConfig.rootNamespace default
    allow_unrouted_wildcards: bool = False
    """Wildcard hosts (resolution NONE) cannot be routed to the gateway (Istio needs a
    concrete destination); set only where that documented limit is what is tested."""


def _name(o: Obj) -> str:
    m = o["metadata"]
    return f"{o['kind']} {m.get('namespace', '')}/{m['name']}"


def _ns(o: Obj) -> str:
    return str(o["metadata"].get("namespace", ""))


def _visible(o: Obj, namespace: str) -> bool:
    """pilot/pkg/model/push_context.go IsServiceVisible and the VirtualService index:
    "." is the object's own namespace, "*" (or no exportTo) is every namespace."""
    export = o["spec"].get("exportTo") or ["*"]
    return "*" in export or namespace in export or ("." in export and _ns(o) == namespace)


def _public(o: Obj) -> bool:
    return "*" in (o["spec"].get("exportTo") or ["*"])


def _exported_beyond_own(o: Obj) -> bool:
    """setDestinationRules: a rule exported only to "." (or its own namespace) is private
    and never found from another namespace."""
    export = o["spec"].get("exportTo") or ["*"]
    return not (len(export) == 1 and export[0] in (".", _ns(o)))


# --- per-object webhook rules (pkg/config/validation/validation.go) -------------------

def _validate_object(o: Obj) -> list[str]:
    out: list[str] = []
    spec, kind, where = o["spec"], o["kind"], _name(o)
    export = spec.get("exportTo") or []
    # validateExportTo: no duplicates, and "." counts as the object's own namespace.
    keys = [_ns(o) if e == "." else e for e in export]
    for e, n in Counter(keys).items():
        if n > 1:
            out.append(f"{where}: duplicate entries in exportTo ({e})")
    if not _DNS_SUBDOMAIN.match(o["metadata"]["name"]):
        out.append(f"{where}: name is not a DNS-1123 subdomain")
    if kind == "Gateway":
        # ValidateGateway: "port names in servers must be unique"; name a DNS label.
        if not _DNS_LABEL.match(o["metadata"]["name"]):
            out.append(f"{where}: invalid gateway name")
        names = Counter(s["port"].get("name", "") for s in spec.get("servers", []))
        for name, n in names.items():
            if not name:
                out.append(f"{where}: a server port has no name")
            elif n > 1:
                out.append(f"{where}: port names in servers must be unique: duplicate name {name}")
        if not spec.get("servers"):
            out.append(f"{where}: gateway must have at least one server")
    elif kind == "DestinationRule":
        # ValidateDestinationRule: "duplicate subset names"; validateSubsetName: DNS label.
        names = Counter(s["name"] for s in spec.get("subsets", []))
        for name, n in names.items():
            if n > 1:
                out.append(f"{where}: duplicate subset names: {name}")
            if not _DNS_LABEL.match(name):
                out.append(f"{where}: subset name is invalid: {name}")
    elif kind == "ServiceEntry":
        # ValidateServiceEntry: port names and numbers each defined once.
        for field in ("name", "number"):
            for value, n in Counter(p[field] for p in spec.get("ports", [])).items():
                if n > 1:
                    out.append(f"{where}: service entry port {field} {value} already defined")
    elif kind == "VirtualService":
        # ValidateVirtualService: "duplicate hosts in virtual service".
        for h, n in Counter(spec.get("hosts", [])).items():
            if n > 1:
                out.append(f"{where}: duplicate hosts in virtual service: {h}")
    return out


# --- lookups, as istiod does them ------------------------------------------------------

class _Index:
    def __init__(self, objects: Sequence[Obj], mesh: Mesh) -> None:
        self.mesh = mesh
        self.by_kind: dict[str, list[Obj]] = defaultdict(list)
        for o in objects:
            self.by_kind[o["kind"]].append(o)

    def service_entry(self, host: str, namespace: str) -> tuple[Obj | None, str]:
        """The ServiceEntry a sidecar of `namespace` uses for `host`. SidecarScope keeps the
        first service per hostname (pilot/pkg/model/sidecar.go), taken in the order of
        push_context.go servicesExportedToNamespace: those exported to this namespace (or
        private to it) before public ones. Within one rank istiod takes the oldest, which
        we cannot see: there, all candidates must agree on ports."""
        seen = [o for o in self.by_kind["ServiceEntry"]
                if host in o["spec"]["hosts"] and _visible(o, namespace)]
        for rank in (False, True):
            tier = [o for o in seen if _public(o) is rank]
            # sidecar.go appendSidecarServices / canMergeServices: services of one hostname
            # from the same namespace with the same resolution and exportTo are merged (ports
            # added up); from different namespaces only the first (oldest) counts.
            merged: dict[tuple[str, str, tuple[str, ...]], dict[int, str]] = {}
            for o in tier:
                key = (_ns(o), o["spec"].get("resolution", "NONE"),
                       tuple(sorted(o["spec"].get("exportTo") or ["*"])))
                for p in o["spec"]["ports"]:
                    merged.setdefault(key, {}).setdefault(p["number"], p["protocol"])
            if len({tuple(sorted(v.items())) for v in merged.values()}) > 1:
                return None, (f"{host}: ServiceEntries visible from {namespace} disagree on "
                              f"ports ({', '.join(_name(o) for o in tier)}): istiod keeps the "
                              "oldest, so the others' ports may not exist there")
            if tier:
                first = dict(tier[0])
                first["spec"] = {**tier[0]["spec"], "ports": [
                    {"number": n, "protocol": proto}
                    for n, proto in sorted(next(iter(merged.values())).items())]}
                return first, ""
        return None, f"{host}: no ServiceEntry visible"

    def mesh_virtual_service(self, host: str, namespace: str) -> Obj | None:
        """model.SelectVirtualServices: own namespace, then exported to it, then public."""
        bound = [o for o in self.by_kind["VirtualService"]
                 if host in o["spec"].get("hosts", []) and _visible(o, namespace)
                 and "mesh" in (o["spec"].get("gateways") or ["mesh"])]

        bound.sort(key=lambda o: (_ns(o) != namespace, _public(o)))
        return bound[0] if bound else None

    def destination_rule(self, namespace: str) -> tuple[Obj | None, str]:
        """push_context.go destinationRule(): proxy namespace (rules visible there), the
        gateway Service's namespace, the root namespace (rules exported beyond their own
        namespace, to this one). The first namespace with a rule for the host wins.
        setDestinationRules: a rule is private when its exportTo is "." or its own namespace
        alone."""
        host = self.mesh.gateway_host
        rules = [o for o in self.by_kind["DestinationRule"] if o["spec"]["host"] == host]
        # A proxy in the root namespace first looks only at the root namespace's *private*
        # rules (setDestinationRules' rootNamespaceLocal); an exported rule there is found
        # only in the last step, after the gateway namespace's.
        root = namespace == self.mesh.root_namespace
        steps: list[tuple[str, bool]] = [
            (namespace, True), (self.mesh.gateway_namespace, False),
            (self.mesh.root_namespace, False)]
        for where, local in steps:
            found = [o for o in rules if _ns(o) == where and (
                (_visible(o, namespace) and not (root and _exported_beyond_own(o))) if local
                else _exported_beyond_own(o) and _visible(o, namespace))]
            if len(found) > 1:
                return None, (f"several DestinationRules for {host} in {where} "
                              f"({', '.join(_name(o) for o in found)}): istiod merges them by "
                              "creation time; we never rely on that")
            if found:
                return found[0], ""
        return None, ""

    def gateway_servers(self) -> list[tuple[Obj, Obj]]:
        return [(g, s) for g in self.by_kind["Gateway"]
                if _ns(g) == self.mesh.gateway_namespace for s in g["spec"].get("servers", [])]

    def gateway_virtual_services(self, gateway: Obj) -> list[Obj]:
        """VirtualServicesForGateway: bound by `ns/name` (or a bare name in the
        VirtualService's own namespace) and visible to the gateway's namespace."""
        gname, gns = gateway["metadata"]["name"], _ns(gateway)
        out = []
        for vs in self.by_kind["VirtualService"]:
            refs = vs["spec"].get("gateways") or ["mesh"]
            if any(r == f"{gns}/{gname}" or (r == gname and _ns(vs) == gns) for r in refs) \
                    and _visible(vs, gns):
                out.append(vs)
        return out


def _match_ok(match: Sequence[Mapping[str, Any]] | None, *, gateway: str, port: int,
              sni: str | None = None) -> bool:
    """A route's match list covers (gateway, port[, sni]); no match list matches all."""
    if not match:
        return True
    for m in match:
        gws = m.get("gateways")
        if gws and gateway not in gws:
            continue
        if m.get("port") not in (None, port):
            continue
        if sni is not None and m.get("sniHosts") and sni not in m["sniHosts"]:
            continue
        return True
    return False


def _mesh_route(vs: Obj, host: str, port: int, protocol: str) -> Mapping[str, Any] | None:
    """The destination the first matching route of `vs` sends (host, port) to."""
    spec = vs["spec"]
    sections = ("tls", "tcp") if protocol == "TLS" else ("http",)
    for section in sections:
        for r in spec.get(section, []) or []:
            sni = host if section == "tls" else None
            if _match_ok(r.get("match"), gateway="mesh", port=port, sni=sni):
                routes = r.get("route") or []
                return routes[0]["destination"] if routes else None
    return None


def _gateway_route(vs: Obj, gateway_ref: str, port: int, server_protocol: str
                   ) -> Mapping[str, Any] | None:
    # A TLS server that terminates (ISTIO_MUTUAL) hands the gateway plain TCP: it is
    # routed by the VirtualService's tcp section; an HTTPS server by its http section.
    section = "tcp" if server_protocol == "TLS" else "http"
    for r in vs["spec"].get(section, []) or []:
        if _match_ok(r.get("match"), gateway=gateway_ref, port=port):
            routes = r.get("route") or []
            return routes[0]["destination"] if routes else None
    return None


def _server_hosts(server: Mapping[str, Any]) -> list[str]:
    return [h.split("/", 1)[-1] for h in server.get("hosts", [])]


def _host_matches(pattern: str, host: str) -> bool:
    return pattern == "*" or pattern == host or (
        pattern.startswith("*.") and host.endswith(pattern[1:]))


def check(objects: Iterable[Obj], *, mesh: Mesh | None = None,
          installed: Iterable[Obj] = (), namespaces: Iterable[str] = ()) -> list[str]:
    """Every Istio rule `objects` (what we write) break, given `installed` objects (the
    chart's Gateway), seen from every namespace in the objects plus `namespaces` (pass
    at least one namespace that has no policy of its own)."""
    mesh = mesh or Mesh()
    written = list(objects)
    problems: list[str] = []

    # (kind, namespace, name) is the identity of an object: two with one key means one
    # of them is silently lost (server-side apply merges them into one).
    keys = Counter((o["kind"], _ns(o), o["metadata"]["name"]) for o in written)
    problems += [f"{k} {ns}/{n}: written {c} times" for (k, ns, n), c in keys.items() if c > 1]
    for o in written:
        problems += _validate_object(o)

    idx = _Index([*written, *installed], mesh)
    # Only the gateway's own pods run in its namespace: it is no sidecar's vantage point.
    looking_from = sorted(({_ns(o) for o in written} | set(namespaces))
                          - {mesh.gateway_namespace})
    for ns in looking_from:
        problems += _check_namespace(idx, ns)
    problems += _check_servers(idx, written)
    return problems


def _check_namespace(idx: _Index, ns: str) -> list[str]:
    """Every host a sidecar of `ns` can dial is routed to the gateway, with the SNI the
    gateway needs, through a subset the DestinationRule that sidecar finds defines."""
    out: list[str] = []
    mesh = idx.mesh
    hosts = sorted({h for o in idx.by_kind["ServiceEntry"] if _visible(o, ns)
                    for h in o["spec"]["hosts"]})
    dr, dr_problem = idx.destination_rule(ns)
    if dr_problem:
        out.append(f"from {ns}: {dr_problem}")
    for host in hosts:
        if host.startswith("*."):
            if not mesh.allow_unrouted_wildcards:
                out.append(f"from {ns}: {host}: a wildcard host is dialable but not routed "
                           "to the gateway")
            continue
        se, problem = idx.service_entry(host, ns)
        if se is None:
            out.append(f"from {ns}: {problem}")
            continue
        vs = idx.mesh_virtual_service(host, ns)
        if vs is None:
            out.append(f"from {ns}: {host} ({_name(se)}) has no VirtualService: a sidecar "
                       "dials it directly, without the gateway")
            continue
        for port in se["spec"]["ports"]:
            number, protocol = port["number"], port["protocol"]
            dest = _mesh_route(vs, host, number, protocol)
            where = f"from {ns}: {host}:{number} ({_name(vs)})"
            if dest is None or dest.get("host") != mesh.gateway_host:
                out.append(f"{where}: not routed to the gateway")
                continue
            gw_port = (dest.get("port") or {}).get("number")
            subset = dest.get("subset")
            if dr is None:
                out.append(f"{where}: no DestinationRule for the gateway is visible, so "
                           f"subset {subset} is undefined")
                continue
            found = [s for s in dr["spec"].get("subsets", []) if s["name"] == subset]
            if not found:
                out.append(f"{where}: subset {subset} is not in {_name(dr)}, the "
                           "DestinationRule this sidecar finds first")
                continue
            policy = found[0].get("trafficPolicy") or {}
            tls = next((p.get("tls") for p in policy.get("portLevelSettings", [])
                        if p["port"]["number"] == gw_port), policy.get("tls"))
            if not tls or tls.get("mode") != "ISTIO_MUTUAL" or tls.get("sni") != host:
                out.append(f"{where}: subset {subset} of {_name(dr)} does not send Istio mTLS "
                           f"with SNI {host} on gateway port {gw_port}")
                continue
            out += _check_gateway_leg(idx, where, host, number, protocol, gw_port)
    return out


def _check_gateway_leg(idx: _Index, where: str, host: str, port: int, protocol: str,
                       gw_port: int) -> list[str]:
    """On the gateway: a server for (host, gateway port) and a route from it to the host
    on the port the app dialled."""
    want = ("TLS",) if protocol == "TLS" else ("HTTPS",)
    servers = [(g, s) for g, s in idx.gateway_servers()
               if s["port"]["number"] == gw_port and s["port"]["protocol"] in want
               and any(_host_matches(h, host) for h in _server_hosts(s))]
    if not servers:
        return [f"{where}: no {want[0]} Gateway server for {host} on gateway port {gw_port}"]
    # The most specific server wins (an exact SNI before "*").
    servers.sort(key=lambda gs: 0 if host in _server_hosts(gs[1]) else 1)
    gateway, server = servers[0]
    ref = f"{_ns(gateway)}/{gateway['metadata']['name']}"
    for vs in idx.gateway_virtual_services(gateway):
        if host not in vs["spec"].get("hosts", []):
            continue
        dest = _gateway_route(vs, ref, gw_port, server["port"]["protocol"])
        if dest is None:
            continue
        if dest.get("host") != host or (dest.get("port") or {}).get("number") != port:
            return [f"{where}: the gateway routes it to {dest.get('host')}:"
                    f"{(dest.get('port') or {}).get('number')} ({_name(vs)})"]
        # The gateway proxy builds the upstream cluster host:port from the ServiceEntry that
        # its own namespace sees for the host; a port that entry lacks has no cluster, and
        # the route goes nowhere.
        se, problem = idx.service_entry(host, idx.mesh.gateway_namespace)
        if se is None:
            return [f"{where}: on the gateway: {problem}"]
        if port not in {p["number"] for p in se["spec"]["ports"]}:
            return [f"{where}: on the gateway, the ServiceEntry it sees for {host} "
                    f"({_name(se)}) has no port {port}"]
        return []
    return [f"{where}: no VirtualService bound to {ref} routes it on port {gw_port}"]


def _check_servers(idx: _Index, written: Sequence[Obj]) -> list[str]:
    """Every server of a Gateway we write has a VirtualService bound to it that routes
    its host on its port (an unbound server is dead configuration at best)."""
    out: list[str] = []
    for g in written:
        if g["kind"] != "Gateway":
            continue
        ref = f"{_ns(g)}/{g['metadata']['name']}"
        bound = idx.gateway_virtual_services(g)
        for s in g["spec"].get("servers", []):
            number, protocol = s["port"]["number"], s["port"]["protocol"]
            for host in _server_hosts(s):
                if not any(host in vs["spec"].get("hosts", [])
                           and _gateway_route(vs, ref, number, protocol) is not None
                           for vs in bound):
                    out.append(f"{_name(g)} server {s['port'].get('name')} ({host}:{number}): "
                               "no VirtualService bound to it routes this host and port")
    return out
