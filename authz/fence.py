"""Layer 3: the NetworkPolicy that keeps a namespace's pods from reaching the internet
around the egress gateway, and whether a namespace that needs one has one.

Pure (no Kubernetes client): the registry writer applies `fence_policy` to namespaces
labelled `egress-authz.io/egress-fence: "true"`; the kube fence monitor and `lint` use
`needs_fence` / `is_fenced` to report a namespace whose policy relies on a wildcard host
while nothing fences it. Why a wildcard: Istio cannot route `*.example.com` through the
gateway (it needs a concrete destination), so the ServiceEntry we write for it (resolution
NONE) lets a sidecar dial matching names directly; only a NetworkPolicy stops that.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import hosts
from .model import MANAGED_BY_LABEL, MANAGED_BY_VALUE, NamespacePolicy, Tier

FENCE_LABEL = "egress-authz.io/egress-fence"
"""Namespace label: "true" opts the namespace in to the NetworkPolicy below."""
FENCE_NAME = "egress-authz-fence"

Obj = dict[str, Any]


@dataclass(frozen=True)
class FenceOptions:
    """Where the fence lets pods go: DNS, the egress gateway, istiod, the cluster's pods."""

    gateway_namespace: str = "istio-egress"
    gateway_selector: Mapping[str, str] = field(default_factory=dict)
    dns_namespace: str = "kube-system"
    dns_labels: Mapping[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    istiod_namespace: str = "istio-system"
    allow_cluster_pods: bool = True
    """Any pod of the cluster (the rest of the mesh). A namespaceSelector never matches an
    address outside the cluster, so this opens no path to the internet."""


def _ns_selector(name: str) -> Obj:
    return {"matchLabels": {"kubernetes.io/metadata.name": name}}


def fence_policy(namespace: str, opt: FenceOptions) -> Obj:
    """The NetworkPolicy for one opted-in namespace (the chart's networkPolicy template
    writes the same rules for namespaces listed by name)."""
    egress: list[Obj] = [
        {"to": [{"namespaceSelector": _ns_selector(opt.dns_namespace),
                 "podSelector": {"matchLabels": dict(opt.dns_labels)}}],
         "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"to": [{"namespaceSelector": _ns_selector(opt.gateway_namespace),
                 "podSelector": {"matchLabels": dict(opt.gateway_selector)}}]},
        {"to": [{"namespaceSelector": _ns_selector(opt.istiod_namespace)}],
         "ports": [{"protocol": "TCP", "port": 15012}]},
    ]
    if opt.allow_cluster_pods:
        egress.append({"to": [{"namespaceSelector": {}}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": FENCE_NAME, "namespace": namespace,
                     "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": egress},
    }


def wildcard_hosts(policy: NamespacePolicy, now: float | None = None) -> list[str]:
    """The wildcard hosts this policy allows (unexpired rules): what it needs fenced."""
    now = time.time() if now is None else now
    return sorted({h for r in policy.rules if r.expires is None or r.expires > now
                   for h in r.hosts if hosts.is_wildcard(h)})


def _opens_everything(rule: Mapping[str, Any]) -> bool:
    peers = rule.get("to")
    if not peers:
        return True  # no `to`: every destination
    for peer in peers:
        block = peer.get("ipBlock") if isinstance(peer, Mapping) else None
        if isinstance(block, Mapping):
            try:
                if ipaddress.ip_network(str(block.get("cidr")), strict=False).prefixlen == 0:
                    return True
            except ValueError:
                continue
    return False


def is_fenced(network_policies: Iterable[Mapping[str, Any]]) -> bool:
    """True when these NetworkPolicies (of one namespace) restrict every pod's egress and
    none of them opens egress to every address. Kubernetes adds NetworkPolicies up, so one
    rule open to all (no `to`, or an ipBlock /0) in any of them undoes the fence; a narrow
    ipBlock (the API server, a database) does not."""
    selects_all = False
    for np in network_policies:
        spec = np.get("spec") or {}
        types = spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec
                                            else ["Ingress"])
        if "Egress" not in types:
            continue
        if any(_opens_everything(r) for r in spec.get("egress") or []):
            return False
        sel = spec.get("podSelector") or {}
        if not sel.get("matchLabels") and not sel.get("matchExpressions"):
            selects_all = True
    return selects_all


def unfenced_wildcards(policies: Iterable[NamespacePolicy],
                       network_policies: Mapping[str, Sequence[Mapping[str, Any]]],
                       now: float | None = None) -> dict[str, list[NamespacePolicy]]:
    """Namespace -> its policies that allow a wildcard host, for every namespace that no
    NetworkPolicy fences (`network_policies`: namespace -> its NetworkPolicies)."""
    out: dict[str, list[NamespacePolicy]] = {}
    for p in policies:
        # The cluster tier's own namespace runs the service, not workloads: its wildcard
        # rules apply to every namespace and are documented as needing every one fenced.
        if (p.tier is Tier.NAMESPACE and wildcard_hosts(p, now)
                and not is_fenced(network_policies.get(p.namespace, []))):
            out.setdefault(p.namespace, []).append(p)
    return out
