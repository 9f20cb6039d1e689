"""PolicySet -> the Istio objects that make allowed hosts, and only those, exist in the mesh.

Pure: no Kubernetes client. The controller (authz.kube.writer) applies the result with
server-side apply; `egress-authz render` prints it for GitOps users. What is written,
following Istio's egress-gateway pattern (sidecar -> gateway over ISTIO_MUTUAL with the
external host as SNI, gateway -> external host), checked against Istio's own rules by
tests/istio_rules.py:

Per namespace with policies (objects are per *namespace*, not per ConfigMap, so that two
ConfigMaps naming the same host can never produce two VirtualServices for one host, which
Istio would not merge; every policy ConfigMap of the namespace is an owner):
- ServiceEntry `egress-authz-dns-<ports>`: exact hosts, MESH_EXTERNAL, resolution DNS; one
  per distinct port set so a host is never admitted on another host's ports.
- ServiceEntry `egress-authz-wildcard-<ports>`: wildcard hosts, resolution NONE (a wildcard
  cannot be resolved). ServiceEntries are exported to "." only: the gateway has its own.
- DestinationRule `egress-authz-gateway` (exportTo ".") for the gateway Service: one subset
  per exact host
  (this namespace's and the cluster tier's: a sidecar that finds this rule looks no
  further), ISTIO_MUTUAL with `sni: <host>`: the gateway sees the caller's SPIFFE identity
  and the host it asked for. A subset depends on its host alone, so every rule that
  defines it defines it the same way.
- VirtualService `egress-authz-<host slug>-<hash>` per exact host: for each port P the app
  may dial, mesh -> gateway Service port P (TLS by SNI, HTTP by port), then gateway port
  P -> host:P. One per host because after terminating the mesh mTLS the gateway routes TCP
  by Gateway server (SNI), and a VirtualService's TCP routes cannot tell hosts apart.
Every generated name ends in a hash of the full host where a host is in it: slugs alone
collide (`my-api.example.com`, `my.api-example.com`), and a lost VirtualService would leave
its host dialable without the gateway.

In the gateway namespace: ServiceEntries `egress-authz-gateway-dns-<ports>` (exportTo ".")
with every exact host the gateway forwards and every port any scope routes it on (istiod
keeps one service per hostname across namespaces, so the namespaces' entries, which may
disagree on ports, are not what the gateway should build its clusters from). One Gateway
`egress-authz-hosts` with a server per (exact host,
port): TLS (ISTIO_MUTUAL) for TLS ports, HTTPS (ISTIO_MUTUAL, HTTP inside) for HTTP ports
other than 80, each with its own port name (Istio refuses duplicates). Plain HTTP on 80
uses the chart's catch-all Gateway (`egress-authz`), where routing is by Host header. And
the cluster-tier DestinationRule (exportTo "*"): a sidecar finds a DestinationRule in its
own namespace, then in the gateway Service's namespace, then in the root namespace, so a
namespace with no policy of its own finds it there.

Cluster tier (the cluster ConfigMap's namespace): its `allow` hosts get ServiceEntries and
VirtualServices there (names with `baseline-`), exportTo ["*"], since the baseline applies
to every namespace.

Order: `render` returns DestinationRules, VirtualServices and the Gateway before the
ServiceEntries; the writer applies in that order and deletes in the reverse one, so a host
never exists in the mesh without its route to the gateway.

Limits (Istio's, documented in docs/kubernetes.md): a wildcard cannot be routed through
the gateway to an arbitrary host (Istio needs a concrete destination; its docs dropped the
SNI-proxy recipe), so wildcard hosts are admitted by the registry but not routed: until
an SNI forward proxy is added, wildcard traffic leaves only where the NetworkPolicy allows.
A port P other than 80/443 works only if the gateway Service exposes P (istio/ values).
A port one scope allows as TLS is TLS for that host everywhere (one gateway server per host
and port). Cluster `deny` hosts are never emitted; a wildcard that covers a denied host
stays (the decision engine still denies that host).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import hosts
from .model import MANAGED_BY_LABEL, MANAGED_BY_VALUE, NamespacePolicy, PolicySet, Protocol, Tier

Obj = dict[str, Any]

ISTIO_API = "networking.istio.io/v1"
PREFIX = "egress-authz"
HOSTS_GATEWAY = f"{PREFIX}-hosts"
GATEWAY_DR = f"{PREFIX}-gateway"
POLICY_REF_ANNOTATION = "egress-authz.io/policies"  # which ConfigMaps an object comes from
GATEWAY_LABEL = "egress-authz.io/gateway"  # on our egress gateway's pods only (istio/ values)
DEFAULT_GATEWAY_SELECTOR = {"istio": "egressgateway", GATEWAY_LABEL: "egress-authz"}


def parse_selector(text: str) -> dict[str, str]:
    """`k=v,k=v` -> labels; raises ValueError with what is wrong."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r} is not key=value")
        out[key.strip()] = value.strip()
    if not out:
        raise ValueError("empty selector")
    return out


@dataclass(frozen=True)
class RenderOptions:
    gateway_namespace: str = "istio-egress"
    """Namespace of the egress gateway: exportTo target and home of the hosts Gateway."""
    gateway_name: str = "egress-authz"
    """The chart's catch-all Gateway (HTTP on port 80) that VirtualServices bind to."""
    gateway_service: str = "istio-egressgateway"
    """Service name of the egress gateway pods."""
    gateway_selector: Mapping[str, str] = field(
        default_factory=lambda: dict(DEFAULT_GATEWAY_SELECTOR))
    """Labels of the egress gateway pods (the hosts Gateway selects them). A legacy Gateway
    selector matches pods in *every* namespace (unless istiod runs with
    PILOT_SCOPE_GATEWAY_TO_NAMESPACE=true), so it includes a label only our gateway has."""
    gateway_tls_port: int = 443
    gateway_http_port: int = 80
    cluster_domain: str = "cluster.local"

    @property
    def gateway_host(self) -> str:
        return f"{self.gateway_service}.{self.gateway_namespace}.svc.{self.cluster_domain}"


@dataclass
class _HostPorts:
    tls: set[int] = field(default_factory=set)
    http: set[int] = field(default_factory=set)

    def key(self) -> tuple[tuple[int, str], ...]:
        # A port that one rule allows as TLS and another as HTTP only is TLS: a ServiceEntry
        # may list a port number once, and TLS keeps every TLS client working.
        return tuple(sorted([(p, "TLS") for p in self.tls]
                            + [(p, "HTTP") for p in self.http - self.tls]))


def _ports_of(policy: NamespacePolicy, now: float, into: dict[str, _HostPorts],
              denied: Iterable[str]) -> None:
    denied = list(denied)
    for rule in policy.rules:
        if rule.expires is not None and rule.expires <= now:
            continue  # an expired rule allows nothing, so it admits nothing
        for host in rule.hosts:
            if host == "*" or _is_denied(host, denied):
                continue
            hp = into.setdefault(host, _HostPorts())
            for port in rule.ports:
                # Port 80 carries plain HTTP; any other port TLS, unless the rule is HTTP-only.
                if port == 80 or rule.protocols == frozenset({Protocol.HTTP}):
                    hp.http.add(port)
                else:
                    hp.tls.add(port)


def _is_denied(host: str, denied: list[str]) -> bool:
    for d in denied:
        if d == "*" or d == host:
            return True
        if hosts.is_wildcard(d):
            suffix = "." + hosts.wildcard_key(d)
            if host.endswith(suffix) and len(host) > len(suffix):
                return True  # `a.x` or `*.b.x` under `*.x`
    return False


def slug(host: str, limit: int = 63) -> str:
    """A readable DNS label for `host`, unique per host: `api.kadath.io` ->
    `api-kadath-io-<10 hex>`. The slug alone is not unique (`my-api.example.com` and
    `my.api-example.com` slug alike, and two objects with one name means one is lost:
    a host whose route was lost would be dialled without the gateway), so every name
    ends in a hash of the full host."""
    text = host.replace("*.", "wildcard.").replace(".", "-")
    digest = hashlib.sha256(host.encode()).hexdigest()[:10]
    return f"{text[: limit - 11].rstrip('-')}-{digest}"


def _meta(name: str, namespace: str, owners: list[NamespacePolicy], *,
          owned: bool = True) -> Obj:
    meta: Obj = {
        "name": name,
        "namespace": namespace,
        "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
        "annotations": {POLICY_REF_ANNOTATION: ",".join(str(p.source) for p in owners)},
    }
    refs = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": p.source.name, "uid": p.uid}
        for p in owners if p.uid and p.source.namespace == namespace
    ]
    if refs and owned:  # policies read from files have no uid, and an owner reference needs one
        meta["ownerReferences"] = refs
    return meta


def _port_token(port: int, proto: str) -> str:
    # Port 80 is HTTP and any other port TLS unless a rule says HTTP only: name the usual
    # case by its number alone, the other with its protocol, so no two port sets share a name.
    usual = "HTTP" if port == 80 else "TLS"
    return str(port) if proto == usual else f"{port}{proto.lower()}"


def _entry_name(kind: str, key: tuple[tuple[int, str], ...], scope: str) -> str:
    ports = "-".join(_port_token(p, proto) for p, proto in key)
    name = f"{PREFIX}-{scope}{kind}-{ports}"
    if len(name) > 63:
        name = f"{PREFIX}-{scope}{kind}-" + hashlib.sha256(ports.encode()).hexdigest()[:10]
    return name


def _port_list(key: tuple[tuple[int, str], ...]) -> list[Obj]:
    return [{"number": p, "name": f"{proto.lower()}-{p}", "protocol": proto} for p, proto in key]


def _export(namespace: str, opt: RenderOptions) -> list[str]:
    # Istio's webhook refuses "." next to the object's own namespace (validateExportTo).
    return ["."] if namespace == opt.gateway_namespace else [".", opt.gateway_namespace]


def _scope_objects(namespace: str, owners: list[NamespacePolicy], host_ports: dict[str, _HostPorts],
                   subsets: set[str], export: list[str], scope: str,
                   opt: RenderOptions, *, entry_export: list[str] | None = None) -> list[Obj]:
    """ServiceEntries and VirtualServices (and, when `subsets` is given, the
    DestinationRule) for one scope: a namespace, or the cluster tier. `entry_export` is
    the ServiceEntries' exportTo (default `export`)."""
    out: list[Obj] = []
    groups: dict[tuple[bool, tuple[tuple[int, str], ...]], list[str]] = {}
    for host, hp in host_ports.items():
        if hp.key():
            groups.setdefault((hosts.is_wildcard(host), hp.key()), []).append(host)
    for (wild, key), names in sorted(groups.items()):
        out.append(_service_entry(
            _meta(_entry_name("wildcard" if wild else "dns", key, scope), namespace, owners),
            names, key, wild=wild, export=export if entry_export is None else entry_export))
    exact = {h: hp for h, hp in host_ports.items() if not hosts.is_wildcard(h) and hp.key()}
    if subsets:
        # Private (exportTo "."): a sidecar in the root namespace finds only that namespace's
        # private rules before the gateway namespace's (push_context.go destinationRule,
        # rootNamespaceLocal), and no other namespace needs this one.
        out.append(_destination_rule(namespace, owners, subsets, ["."], opt))
    for host, hp in sorted(exact.items()):
        out.append(_virtual_service(namespace, owners, host, hp, export, scope, opt))
    return out


def _service_entry(meta: Obj, names: Iterable[str], key: tuple[tuple[int, str], ...], *,
                   wild: bool, export: list[str]) -> Obj:
    return {"apiVersion": ISTIO_API, "kind": "ServiceEntry", "metadata": meta,
            "spec": {"hosts": sorted(names), "location": "MESH_EXTERNAL",
                     "resolution": "NONE" if wild else "DNS",
                     "ports": _port_list(key), "exportTo": export}}


def _gateway_entries(served: dict[str, _HostPorts], served_by: dict[str, list[NamespacePolicy]],
                     opt: RenderOptions) -> list[Obj]:
    """The ServiceEntries the gateway itself builds its upstream clusters from: every host it
    forwards, with every port any scope routes it on. istiod keeps one service per hostname
    across namespaces (the oldest; ports are merged only within one namespace:
    pilot/pkg/model/sidecar.go canMergeServices), so the namespaces' own entries, which may
    list a host on different ports, are not exported to the gateway; these, private to the
    gateway namespace, are what it sees."""
    groups: dict[tuple[tuple[int, str], ...], list[str]] = {}
    for host, hp in served.items():
        if hp.key():
            groups.setdefault(hp.key(), []).append(host)
    out = []
    for key, names in sorted(groups.items()):
        owners = sorted({str(p.source): p for h in names for p in served_by[h]}.values(),
                        key=lambda p: str(p.source))
        out.append(_service_entry(
            _meta(_entry_name("dns", key, GATEWAY_ENTRY_PREFIX[len(PREFIX) + 1:]),
                  opt.gateway_namespace, owners,
                  owned=False), names, key, wild=False, export=["."]))
    return out


def _destination_rule(namespace: str, owners: list[NamespacePolicy], subsets: Iterable[str],
                      export: list[str], opt: RenderOptions, *, owned: bool = True) -> Obj:
    return {
        "apiVersion": ISTIO_API, "kind": "DestinationRule",
        "metadata": _meta(GATEWAY_DR, namespace, owners, owned=owned),
        "spec": {"host": opt.gateway_host, "exportTo": export,
                 "subsets": [_subset(h) for h in sorted(set(subsets))]},
    }


def _subset(host: str) -> Obj:
    # Subset-wide (not per port): a subset is then a function of its host alone, so every
    # DestinationRule that defines it, in any namespace, defines it the same way.
    return {"name": slug(host),
            "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL", "sni": host}}}


def _server_port_name(proto: str, port: int, host: str) -> str:
    # Unique per Gateway (Istio's webhook: "port names in servers must be unique").
    return f"{proto.lower()}-{port}-{hashlib.sha256(host.encode()).hexdigest()[:10]}"


def _virtual_service(namespace: str, owners: list[NamespacePolicy], host: str, hp: _HostPorts,
                     export: list[str], scope: str, opt: RenderOptions) -> Obj:
    """The app dials `host` on port P: sidecar -> gateway Service port P (subset: mTLS with
    SNI `host`) -> the gateway's server for (host, P) -> `host`:P. Each external port has its
    own route, so the gateway forwards to the port that was dialled and the service judges
    the Service port P (the gateway's listener port is translated back by the service)."""
    hosts_gw = f"{opt.gateway_namespace}/{HOSTS_GATEWAY}"
    http_gw = f"{opt.gateway_namespace}/{opt.gateway_name}"
    spec: Obj = {"hosts": [host], "exportTo": export}
    gateways = ["mesh"]
    subset = slug(host)

    def to_gateway(port: int) -> Obj:
        return {"destination": {"host": opt.gateway_host, "subset": subset,
                                "port": {"number": port}}}

    def to_host(port: int) -> Obj:
        return {"destination": {"host": host, "port": {"number": port}}}

    http_ports = sorted(hp.http - hp.tls)  # a port both TLS and HTTP is TLS (_HostPorts.key)
    if hp.tls or any(p != opt.gateway_http_port for p in http_ports):
        gateways.append(hosts_gw)
    if hp.tls:
        spec["tls"] = [{"match": [{"gateways": ["mesh"], "port": p, "sniHosts": [host]}],
                        "route": [to_gateway(p)]} for p in sorted(hp.tls)]
        spec["tcp"] = [{"match": [{"gateways": [hosts_gw], "port": p}], "route": [to_host(p)]}
                       for p in sorted(hp.tls)]
    if http_ports:
        if opt.gateway_http_port in http_ports:
            gateways.append(http_gw)
        spec["http"] = [
            *({"match": [{"gateways": ["mesh"], "port": p}], "route": [to_gateway(p)]}
              for p in http_ports),
            *({"match": [{"gateways": [http_gw if p == opt.gateway_http_port else hosts_gw],
                          "port": p}], "route": [to_host(p)]}
              for p in http_ports),
        ]
    spec["gateways"] = gateways
    return {"apiVersion": ISTIO_API, "kind": "VirtualService",
            "metadata": _meta(f"{PREFIX}-{scope}{slug(host, 63 - len(PREFIX) - 1 - len(scope))}",
                              namespace, owners), "spec": spec}


def render(policy_set: PolicySet, options: RenderOptions | None = None, *,
           now: float | None = None) -> list[Obj]:
    """Every object the policies call for, in a stable order that is safe to apply in:
    routes (VirtualService, DestinationRule, Gateway) before the ServiceEntries that make
    their hosts dialable (see `apply_order`)."""
    opt = options or RenderOptions()
    now = time.time() if now is None else now
    cluster = [p for p in policy_set.policies if p.tier is Tier.CLUSTER]
    denied = [d for p in cluster for d in p.deny]
    if "*" in denied:
        return []  # nobody may reach anything: nothing may exist in the registry

    baseline: dict[str, _HostPorts] = {}
    for p in cluster:
        _ports_of(p, now, baseline, denied)
    baseline = {h: hp for h, hp in baseline.items() if hp.key()}
    by_ns: dict[str, list[NamespacePolicy]] = {}
    for p in policy_set.policies:
        if p.tier is Tier.NAMESPACE:
            by_ns.setdefault(p.namespace, []).append(p)

    scopes: dict[str, dict[str, _HostPorts]] = {}
    for ns in sorted(by_ns):
        own: dict[str, _HostPorts] = {}
        for p in by_ns[ns]:
            _ports_of(p, now, own, denied)
        scopes[ns] = {h: hp for h, hp in own.items() if hp.key()}
    # The gateway has one server per (host, port), so a port is TLS for a host everywhere if
    # any scope says TLS (a plain-HTTP client on it then fails closed: no route matches).
    tls_anywhere: dict[str, set[int]] = {}
    for scope in [baseline, *scopes.values()]:
        for h, hp in scope.items():
            tls_anywhere.setdefault(h, set()).update(hp.tls)
    for scope in [baseline, *scopes.values()]:
        for h, hp in scope.items():
            hp.tls |= hp.http & tls_anywhere[h]
            hp.http -= tls_anywhere[h]

    out: list[Obj] = []
    served: dict[str, _HostPorts] = {}  # exact host -> every port the gateway must serve
    served_by: dict[str, list[NamespacePolicy]] = {}  # exact host -> the policies naming it
    base_subsets = {h for h in baseline if not hosts.is_wildcard(h)}
    gw_ns_owners: list[NamespacePolicy] = []
    gw_ns_subsets: set[str] = set(base_subsets)
    if cluster and baseline:
        owners = sorted(cluster, key=lambda p: p.source.name)
        # Cluster-tier objects carry "baseline-" in their names: a namespace policy in the
        # service's own namespace must never write over them.
        out += _scope_objects(owners[0].namespace, owners, baseline, set(), ["*"], "baseline-",
                              opt)
        gw_ns_owners += owners
    for ns, own in scopes.items():
        owners = sorted(by_ns[ns], key=lambda p: p.source.name)
        # A host the baseline already admits with the same ports needs no second copy. One
        # it admits on other ports gets the union here: this namespace's ServiceEntry and
        # VirtualService come first for its sidecars (Istio prefers objects exported to the
        # namespace over public ones), so they must cover the baseline's ports too.
        for h, hp in list(own.items()):
            if h in baseline:
                merged = _HostPorts(hp.tls | baseline[h].tls, hp.http | baseline[h].http)
                if merged.key() == baseline[h].key():
                    del own[h]
                else:
                    own[h] = merged
        exact = {h for h in own if not hosts.is_wildcard(h)}
        if ns == opt.gateway_namespace:
            # One DestinationRule per namespace: in the gateway namespace the cluster-tier one
            # (below) carries this namespace's subsets too.
            gw_ns_owners += owners
            gw_ns_subsets |= exact
            subsets: set[str] = set()
        else:
            # A sidecar that finds this namespace's DestinationRule looks no further, so it
            # repeats the baseline subsets (identical: a subset depends on its host alone).
            subsets = exact | base_subsets if exact else set()
        # Sidecars of this namespace only: the gateway has entries of its own (below).
        out += _scope_objects(ns, owners, own, subsets, _export(ns, opt), "", opt,
                              entry_export=["."])
        for h in exact:
            _add(served, h, own[h])
            served_by.setdefault(h, []).extend(owners)
    for h in base_subsets:
        _add(served, h, baseline[h])
        served_by.setdefault(h, []).extend(cluster)
    out += _gateway_entries(served, served_by, opt)
    if gw_ns_subsets:
        # Where every sidecar finds it: a sidecar looks in its own namespace, then in the
        # gateway Service's namespace, then in the root namespace (istiod's
        # PushContext.destinationRule), so a namespace with no policy finds this one.
        out.append(_destination_rule(opt.gateway_namespace, gw_ns_owners, gw_ns_subsets, ["*"],
                                     opt, owned=False))
    servers = _hosts_gateway(served, opt)
    if servers is not None:
        out.append(servers)
    return apply_order(out)


def _add(into: dict[str, _HostPorts], host: str, hp: _HostPorts) -> None:
    have = into.setdefault(host, _HostPorts())
    have.tls |= hp.tls
    have.http |= hp.http


def _hosts_gateway(served: dict[str, _HostPorts], opt: RenderOptions) -> Obj | None:
    """One server per (host, port): the gateway picks a filter chain by the SNI the
    sidecar's subset sends, and a VirtualService binds to each server by host and port.
    HTTP on the gateway's HTTP port goes through the chart's catch-all Gateway instead."""
    servers: list[Obj] = []
    for host, hp in sorted(served.items()):
        for port in sorted(hp.tls):
            servers.append({"port": {"number": port, "protocol": "TLS",
                                     "name": _server_port_name("tls", port, host)},
                            "hosts": [host], "tls": {"mode": "ISTIO_MUTUAL"}})
        for port in sorted(hp.http - hp.tls - {opt.gateway_http_port}):
            servers.append({"port": {"number": port, "protocol": "HTTPS",
                                     "name": _server_port_name("https", port, host)},
                            "hosts": [host], "tls": {"mode": "ISTIO_MUTUAL"}})
    if not servers:
        return None
    return {
        "apiVersion": ISTIO_API, "kind": "Gateway",
        "metadata": {"name": HOSTS_GATEWAY, "namespace": opt.gateway_namespace,
                     "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}},
        "spec": {"selector": dict(opt.gateway_selector), "servers": servers},
    }


# Applying in this order never leaves a host dialable without its route: a ServiceEntry
# makes a host exist for the sidecars, so it goes after the subset a route names
# (DestinationRule), the route that sends the host to the gateway (VirtualService) and the
# gateway server it arrives at (Gateway; after its VirtualService, so that no server is
# ever without a route bound to it). Deleting goes the other way round.
APPLY_ORDER = ("DestinationRule", "VirtualService", "Gateway", "ServiceEntry")


GATEWAY_ENTRY_PREFIX = f"{PREFIX}-gateway-"  # the gateway's own ServiceEntries (_gateway_entries)


def gateway_entry_last(key: tuple[str, str, str, str]) -> bool:
    """Sort key (an `object_key`): the gateway's own ServiceEntries after the others. They
    are applied before the sidecars' ones (the gateway can forward a host before any sidecar
    can dial it) and narrowed or deleted after them."""
    return key[1] == "ServiceEntry" and key[3].startswith(GATEWAY_ENTRY_PREFIX)


def apply_order(objs: Iterable[Obj]) -> list[Obj]:
    """`objs` sorted for applying: routes first, then the gateway's ServiceEntries, the
    sidecars' ServiceEntries last (stable otherwise)."""
    return sorted(objs, key=lambda o: (APPLY_ORDER.index(o["kind"]),
                                       not gateway_entry_last(object_key(o))))


def object_key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])
