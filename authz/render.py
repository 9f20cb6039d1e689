"""PolicySet -> the Istio objects that make allowed hosts, and only those, exist in the mesh.

Pure: no Kubernetes client. The controller (authz.kube.writer) applies the result with
server-side apply; `egress-authz render` prints it for GitOps users. What is written,
following Istio's egress-gateway pattern (sidecar -> gateway over ISTIO_MUTUAL with the
external host as SNI, gateway -> external host):

Per namespace with policies (objects are per *namespace*, not per ConfigMap, so that two
ConfigMaps naming the same host can never produce two VirtualServices for one host, which
Istio would not merge; every policy ConfigMap of the namespace is an owner):
- ServiceEntry `egress-authz-dns-<ports>`: exact hosts, MESH_EXTERNAL, resolution DNS; one
  per distinct port set so a host is never admitted on another host's ports.
- ServiceEntry `egress-authz-wildcard-<ports>`: wildcard hosts, resolution NONE (a wildcard
  cannot be resolved). exportTo is always [".", <gateway namespace>].
- DestinationRule `egress-authz-gateway` for the gateway Service: one subset per exact host
  whose port-level TLS is ISTIO_MUTUAL with `sni: <host>`: the gateway sees the caller's
  SPIFFE identity and the host it asked for.
- VirtualService `egress-authz-<host>` per exact host: mesh -> gateway subset (TLS by SNI,
  HTTP by port), then gateway -> host. One per host because after terminating the mesh
  mTLS the gateway routes TCP by Gateway server (SNI), and a VirtualService's TCP routes
  cannot tell its hosts apart.
In the gateway namespace: one Gateway `egress-authz-hosts` with a TLS (ISTIO_MUTUAL) server
per exact host, so the gateway selects a filter chain by that SNI. Plain HTTP uses the
chart's catch-all Gateway (`egress-authz`, port 80), where routing is by Host header.

Cluster tier (the cluster ConfigMap's namespace): its `allow` hosts get the same objects
there with exportTo ["*"], since the baseline applies to every namespace; namespace
DestinationRules repeat the baseline subsets because a sidecar uses its own namespace's
DestinationRule for the gateway host when there is one.

Limits (Istio's, documented in docs/kubernetes.md): a wildcard cannot be routed through
the gateway to an arbitrary host (Istio needs a concrete destination; its docs dropped the
SNI-proxy recipe), so wildcard hosts are admitted by the registry but not routed: until
an SNI forward proxy is added, wildcard traffic leaves only where the NetworkPolicy allows.
A host allowed on several TLS ports is routed from the gateway to 443 (or its lowest TLS
port). Cluster `deny` hosts are never emitted; a wildcard that covers a denied host stays
(the decision engine still denies that host).
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


@dataclass(frozen=True)
class RenderOptions:
    gateway_namespace: str = "istio-egress"
    """Namespace of the egress gateway: exportTo target and home of the hosts Gateway."""
    gateway_name: str = "egress-authz"
    """The chart's catch-all Gateway (HTTP on port 80) that VirtualServices bind to."""
    gateway_service: str = "istio-egressgateway"
    """Service name of the egress gateway pods."""
    gateway_selector: Mapping[str, str] = field(
        default_factory=lambda: {"istio": "egressgateway"})
    """Labels of the egress gateway pods (the hosts Gateway selects them)."""
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
        return tuple(sorted([(p, "TLS") for p in self.tls] + [(p, "HTTP") for p in self.http]))


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
    """A DNS label for names and subsets: `api.kadath.io` -> `api-kadath-io`."""
    text = host.replace("*.", "wildcard.").replace(".", "-")
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(host.encode()).hexdigest()[:8]
    return f"{text[: limit - 9].rstrip('-')}-{digest}"


def _meta(name: str, namespace: str, owners: list[NamespacePolicy]) -> Obj:
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
    if refs:  # policies read from files have no uid, and an owner reference needs one
        meta["ownerReferences"] = refs
    return meta


def _port_list(key: tuple[tuple[int, str], ...]) -> list[Obj]:
    return [{"number": p, "name": f"{proto.lower()}-{p}", "protocol": proto} for p, proto in key]


def _scope_objects(namespace: str, owners: list[NamespacePolicy], host_ports: dict[str, _HostPorts],
                   extra_subsets: dict[str, _HostPorts], export: list[str],
                   opt: RenderOptions) -> list[Obj]:
    out: list[Obj] = []
    groups: dict[tuple[bool, tuple[tuple[int, str], ...]], list[str]] = {}
    for host, hp in host_ports.items():
        if hp.key():
            groups.setdefault((hosts.is_wildcard(host), hp.key()), []).append(host)
    for (wild, key), names in sorted(groups.items()):
        kind = "wildcard" if wild else "dns"
        ports = "-".join(str(p) for p, _ in key)
        out.append({
            "apiVersion": ISTIO_API, "kind": "ServiceEntry",
            "metadata": _meta(f"{PREFIX}-{kind}-{ports}", namespace, owners),
            "spec": {"hosts": sorted(names), "location": "MESH_EXTERNAL",
                     "resolution": "NONE" if wild else "DNS",
                     "ports": _port_list(key), "exportTo": export},
        })
    exact = {h: hp for h, hp in host_ports.items() if not hosts.is_wildcard(h) and hp.key()}
    subsets = {**{h: hp for h, hp in extra_subsets.items() if hp.key()}, **exact}
    if subsets:
        out.append({
            "apiVersion": ISTIO_API, "kind": "DestinationRule",
            "metadata": _meta(GATEWAY_DR, namespace, owners),
            "spec": {"host": opt.gateway_host, "exportTo": export,
                     "subsets": [_subset(h, hp, opt) for h, hp in sorted(subsets.items())]},
        })
    for host, hp in sorted(exact.items()):
        out.append(_virtual_service(namespace, owners, host, hp, export, opt))
    return out


def _subset(host: str, hp: _HostPorts, opt: RenderOptions) -> Obj:
    gw_ports = ([opt.gateway_tls_port] if hp.tls else []) + (
        [opt.gateway_http_port] if hp.http else [])
    return {"name": slug(host), "trafficPolicy": {"portLevelSettings": [
        {"port": {"number": p}, "tls": {"mode": "ISTIO_MUTUAL", "sni": host}}
        for p in gw_ports]}}


def _virtual_service(namespace: str, owners: list[NamespacePolicy], host: str, hp: _HostPorts,
                     export: list[str], opt: RenderOptions) -> Obj:
    hosts_gw = f"{opt.gateway_namespace}/{HOSTS_GATEWAY}"
    http_gw = f"{opt.gateway_namespace}/{opt.gateway_name}"
    spec: Obj = {"hosts": [host], "exportTo": export}
    gateways = ["mesh"]
    to_gateway = {"host": opt.gateway_host, "subset": slug(host)}
    if hp.tls:
        gateways.append(hosts_gw)
        spec["tls"] = [{
            "match": [{"gateways": ["mesh"], "port": p, "sniHosts": [host]}],
            "route": [{"destination": {**to_gateway, "port": {"number": opt.gateway_tls_port}}}],
        } for p in sorted(hp.tls)]
        upstream = opt.gateway_tls_port if opt.gateway_tls_port in hp.tls else min(hp.tls)
        spec["tcp"] = [{
            "match": [{"gateways": [hosts_gw], "port": opt.gateway_tls_port}],
            "route": [{"destination": {"host": host, "port": {"number": upstream}}}],
        }]
    if hp.http:
        gateways.append(http_gw)
        upstream = 80 if 80 in hp.http else min(hp.http)
        spec["http"] = [
            *({"match": [{"gateways": ["mesh"], "port": p}],
               "route": [{"destination": {**to_gateway,
                                          "port": {"number": opt.gateway_http_port}}}]}
              for p in sorted(hp.http)),
            {"match": [{"gateways": [http_gw], "port": opt.gateway_http_port}],
             "route": [{"destination": {"host": host, "port": {"number": upstream}}}]},
        ]
    spec["gateways"] = gateways
    return {"apiVersion": ISTIO_API, "kind": "VirtualService",
            "metadata": _meta(f"{PREFIX}-{slug(host, 240)}", namespace, owners), "spec": spec}


def render(policy_set: PolicySet, options: RenderOptions | None = None, *,
           now: float | None = None) -> list[Obj]:
    """Every object the policies call for, in a stable order."""
    opt = options or RenderOptions()
    now = time.time() if now is None else now
    cluster = [p for p in policy_set.policies if p.tier is Tier.CLUSTER]
    denied = [d for p in cluster for d in p.deny]
    if "*" in denied:
        return []  # nobody may reach anything: nothing may exist in the registry

    baseline: dict[str, _HostPorts] = {}
    for p in cluster:
        _ports_of(p, now, baseline, denied)
    by_ns: dict[str, list[NamespacePolicy]] = {}
    for p in policy_set.policies:
        if p.tier is Tier.NAMESPACE:
            by_ns.setdefault(p.namespace, []).append(p)

    out: list[Obj] = []
    gateway_hosts: set[str] = {h for h, hp in baseline.items()
                               if hp.tls and not hosts.is_wildcard(h)}
    if cluster and baseline:
        owners = sorted(cluster, key=lambda p: p.source.name)
        out += _scope_objects(owners[0].namespace, owners, baseline, {}, ["*"], opt)
    for ns in sorted(by_ns):
        owners = sorted(by_ns[ns], key=lambda p: p.source.name)
        own: dict[str, _HostPorts] = {}
        for p in owners:
            _ports_of(p, now, own, denied)
        # A host the baseline already admits with the same ports needs no second copy.
        own = {h: hp for h, hp in own.items()
               if h not in baseline or baseline[h].key() != hp.key()}
        gateway_hosts |= {h for h, hp in own.items() if hp.tls and not hosts.is_wildcard(h)}
        out += _scope_objects(ns, owners, own, baseline, [".", opt.gateway_namespace], opt)
    if gateway_hosts:
        out.append(_hosts_gateway(sorted(gateway_hosts), opt))
    return out


def _hosts_gateway(names: list[str], opt: RenderOptions) -> Obj:
    return {
        "apiVersion": ISTIO_API, "kind": "Gateway",
        "metadata": {"name": HOSTS_GATEWAY, "namespace": opt.gateway_namespace,
                     "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}},
        "spec": {"selector": dict(opt.gateway_selector), "servers": [
            {"port": {"number": opt.gateway_tls_port, "name": f"tls-{HOSTS_GATEWAY}",
                      "protocol": "TLS"},
             "hosts": [h], "tls": {"mode": "ISTIO_MUTUAL"}}
            for h in names]},
    }


def object_key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])
