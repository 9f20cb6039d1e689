"""Every Kubernetes API call egress-authz makes, as RBAC would grant it.

The Helm chart's ClusterRole/Role are built from this table and a test checks they match;
authz.kube.client refuses any call not listed here, so the table cannot drift from the
code. Server-side apply is a PATCH, so it needs `patch`; an apply that creates the object
is authorized as `create` as well (Kubernetes API concepts, "Patch and apply"), so the
kinds we apply also need `create` although no request of ours is a POST.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..fence import FENCE_NAME


class Scope(StrEnum):
    CLUSTER = "cluster"  # across all namespaces: a ClusterRole
    SERVICE_NAMESPACE = "service-namespace"  # only the service's own namespace: a Role
    GATEWAY_NAMESPACE = "gateway-namespace"  # only the egress gateway's namespace: a Role


@dataclass(frozen=True)
class Permission:
    group: str  # "" is the core API group
    version: str
    resource: str  # plural, as in RBAC rules and URLs
    kind: str
    verbs: frozenset[str]
    scope: Scope
    why: str
    names: frozenset[str] = frozenset()
    """RBAC resourceNames: only these objects (empty: any). Kubernetes cannot limit
    create, list or watch by name, so a row with names holds none of those."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


def _p(group: str, version: str, resource: str, kind: str, verbs: str, scope: Scope,
       why: str, names: str = "") -> Permission:
    return Permission(group, version, resource, kind, frozenset(verbs.split()), scope, why,
                      frozenset(names.split()))


_ISTIO_WRITE = "list watch create patch delete"
PERMISSIONS: tuple[Permission, ...] = (
    _p("", "v1", "configmaps", "ConfigMap", "list watch", Scope.CLUSTER,
       "policy ConfigMaps in every namespace, and the cluster tier"),
    _p("", "v1", "pods", "Pod", "list watch", Scope.CLUSTER,
       "workload identity: source IP -> namespace, service account, labels"),
    _p("", "v1", "namespaces", "Namespace", "list watch", Scope.CLUSTER,
       "--namespace-selector: which namespaces' policies count"),
    _p("", "v1", "events", "Event", "create patch", Scope.CLUSTER,
       "PolicyInvalid / PolicyAccepted Events on policy ConfigMaps; patch: repeats bump count"),
    _p("coordination.k8s.io", "v1", "leases", "Lease", "get create update",
       Scope.SERVICE_NAMESPACE, "leader election: only the holder writes Istio objects"),
    _p("networking.istio.io", "v1", "serviceentries", "ServiceEntry", _ISTIO_WRITE,
       Scope.CLUSTER, "the mesh registry: apply, prune by label, restore hand edits"),
    _p("networking.istio.io", "v1", "virtualservices", "VirtualService", _ISTIO_WRITE,
       Scope.CLUSTER, "routes from sidecars through the egress gateway"),
    _p("networking.istio.io", "v1", "destinationrules", "DestinationRule", _ISTIO_WRITE,
       Scope.CLUSTER, "ISTIO_MUTUAL with the external host as SNI to the gateway"),
    _p("networking.istio.io", "v1", "gateways", "Gateway", _ISTIO_WRITE, Scope.CLUSTER,
       "per-host TLS servers on the egress gateway"),
    _p("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", "list watch create",
       Scope.CLUSTER, "layer 3: fence namespaces labelled egress-authz.io/egress-fence=true "
       "(an apply that creates is also a create); report wildcard policies in namespaces no "
       "NetworkPolicy fences"),
    # Only the fence itself may be changed or deleted: never a NetworkPolicy of the user's.
    _p("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", "patch delete",
       Scope.CLUSTER, "apply the fence, remove it when the label goes", names=FENCE_NAME),
    _p("", "v1", "services", "Service", "list watch", Scope.GATEWAY_NAMESPACE,
       "the gateway Service's port -> targetPort: the gateway port map"),
)

# What a person running `egress-authz traces|explain|suggest|ui --kube` needs
# (authz/commands/replicas.py, authz/commands/ui.py): not the service's own
# calls, so not in PERMISSIONS; the chart's optional `-cli` Role grants them
# (rbac.cli) and tests/test_chart_rbac.py holds the two together.
CLI_PERMISSIONS: tuple[Permission, ...] = (
    _p("", "v1", "pods", "Pod", "list", Scope.SERVICE_NAMESPACE,
       "--kube: find the service's ready replicas"),
    _p("", "v1", "pods/portforward", "Pod", "create get", Scope.SERVICE_NAMESPACE,
       "--kube: reach each replica's admin port (the WebSocket upgrade is a GET; "
       "RBAC checks create, and get on older clusters)"),
)

BY_KIND: dict[str, tuple[Permission, ...]] = {
    kind: tuple(p for p in PERMISSIONS if p.kind == kind) for kind in {p.kind for p in PERMISSIONS}}
ISTIO_KINDS = ("ServiceEntry", "DestinationRule", "VirtualService", "Gateway")


class NotPermitted(RuntimeError):
    """A call the permissions table does not list: a bug, never a runtime condition."""


def require(kind: str, verb: str, name: str | None = None) -> Permission:
    for perm in BY_KIND.get(kind, ()):
        if verb in perm.verbs and (not perm.names or name in perm.names):
            return perm
    what = f"{verb} {kind}" + (f" {name}" if name else "")
    raise NotPermitted(f"{what} is not in authz.kube.permissions.PERMISSIONS")


APPLY_CONTENT_TYPE = "application/apply-patch+yaml"


def verbs_of(method: str, content_type: str, *, collection: bool, watch: bool = False
             ) -> set[str]:
    """Every RBAC verb one HTTP request may be authorized as: an apply is also a create."""
    verb = verb_of(method, collection=collection, watch=watch)
    if verb == "patch" and content_type.startswith(APPLY_CONTENT_TYPE):
        return {"patch", "create"}
    return {verb}


def verb_of(method: str, *, collection: bool, watch: bool = False) -> str:
    """The RBAC verb of one HTTP request."""
    if method == "GET":
        return "watch" if watch else ("list" if collection else "get")
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
