"""The values every stage of a decision passes along.

Request parsing turns Envoy's CheckRequest into an Identity and a Destination;
the policy parser turns ConfigMaps into NamespacePolicy values; the engine
turns all of them into a Decision. Everything here is frozen and pure.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Label and data keys of the ConfigMaps users write: a public contract.
POLICY_LABEL = "egress-authz.io/policy"
TIER_LABEL = "egress-authz.io/tier"
TIER_CLUSTER = "cluster"
POLICY_DATA_KEY = "policy.yaml"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "egress-authz"

EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})


class Verdict(enum.StrEnum):
    """What happened to the request, as recorded in traces."""

    ALLOW = "allow"
    DENY = "deny"
    AUDIT = "audit"  # would be denied; allowed because the namespace is in audit mode


class Reason(enum.StrEnum):
    """Stable reason codes: metric labels, decision-log fields, HTTP deny bodies."""

    ALLOWED = "allowed"
    HOST_NOT_ALLOWED = "host-not-allowed"
    CLUSTER_DENIED = "cluster-denied"
    NO_POLICY = "no-policy"
    PORT_NOT_ALLOWED = "port-not-allowed"
    PROTOCOL_NOT_ALLOWED = "protocol-not-allowed"
    METHOD_NOT_ALLOWED = "method-not-allowed"
    PATH_NOT_ALLOWED = "path-not-allowed"
    RULE_EXPIRED = "rule-expired"
    INVALID_HOST = "invalid-host"
    IP_LITERAL = "ip-literal"
    SNI_HOST_MISMATCH = "sni-host-mismatch"
    UNTRUSTED_IDENTITY = "untrusted-identity"
    IDENTITY_MISMATCH = "identity-mismatch"
    BAD_REQUEST = "bad-request"
    PORT_MISMATCH = "port-mismatch"
    UNKNOWN_WORKLOAD = "unknown-workload"


# Denials that audit mode never lifts: they are about the request itself, not
# about what a namespace chose to allow.
ALWAYS_ENFORCED = frozenset(
    {
        Reason.CLUSTER_DENIED,
        Reason.INVALID_HOST,
        Reason.IP_LITERAL,
        Reason.SNI_HOST_MISMATCH,
        Reason.UNTRUSTED_IDENTITY,
        Reason.IDENTITY_MISMATCH,
        Reason.BAD_REQUEST,
        Reason.PORT_MISMATCH,
        Reason.UNKNOWN_WORKLOAD,
    }
)


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"


class Protocol(enum.StrEnum):
    TLS = "TLS"
    HTTP = "HTTP"


class Tier(enum.StrEnum):
    NAMESPACE = "namespace"
    CLUSTER = "cluster"


# --------------------------------------------------------------------------
# The request side

# Values built once per Check (Identity, Destination, Decision) are plain
# slotted dataclasses, not frozen ones: a frozen dataclass pays one
# object.__setattr__ per field on construction, about 3 µs per Decision here,
# more than the whole lookup. Nothing mutates them after construction.


@dataclass(frozen=True, slots=True)
class Workload:
    """What the Pod found by source IP says about the caller."""

    namespace: str
    service_account: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_LABELS)
    name: str = ""
    ip: str = ""  # status.podIP
    ips: tuple[str, ...] = ()  # every address of status.podIPs (dual-stack: one per family)


@dataclass(slots=True)
class Identity:
    """Who is calling, as seen at the gateway.

    `principal` is the raw peer principal (a SPIFFE URI when the mesh is
    healthy); `workload` is the Pod the resolver found for `source_ip`, or
    None when no Pod is known for it (then rules that select by label do not
    apply). `pod_required`: every legitimate caller is a known Pod (a Pod
    source is configured and unknown sources are refused), so no Pod at
    `source_ip` is a denial, `unknown-workload` (see authz/identity.py).
    """

    principal: str
    source_ip: str = ""
    workload: Workload | None = None
    pod_required: bool = False


@dataclass(slots=True)
class Destination:
    """Where the caller wants to go, raw as seen; the engine normalises it.

    `sni` comes from the TLS session (network filter, or TLS under the HTTP
    filter); `http_host` from the Host/:authority header. `protocol` is HTTP
    when the HTTP filter saw the request, TLS otherwise. `port` is the port
    the app dialled: the gateway listener port translated by the gateway port
    map, or 0 when the map does not know that listener port.
    """

    port: int
    protocol: Protocol
    sni: str | None = None
    http_host: str | None = None
    method: str | None = None
    path: str | None = None
    listener_port: int = 0  # the gateway's own listener port, before the port map


# --------------------------------------------------------------------------
# The policy side


@dataclass(frozen=True, slots=True)
class ConfigMapRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class LabelRequirement:
    key: str
    operator: str  # In, NotIn, Exists, DoesNotExist
    values: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """All given parts must match; an empty selector matches every workload."""

    service_accounts: frozenset[str] | None = None
    match_labels: Mapping[str, str] = field(default_factory=lambda: EMPTY_LABELS)
    match_expressions: tuple[LabelRequirement, ...] = ()

    @property
    def uses_labels(self) -> bool:
        return bool(self.match_labels) or bool(self.match_expressions)


@dataclass(frozen=True, slots=True)
class HttpMatch:
    methods: frozenset[str] | None = None  # upper case; None = any
    paths: tuple[str, ...] | None = None  # prefixes; None = any
    # Whole paths, matched exactly (`suggest` writes these: what was seen, no more).
    # A request passes the path stage when it matches a prefix or an exact path.
    exact_paths: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    index: int
    hosts: tuple[str, ...]  # normalised patterns: "api.kadath.io" or "*.kadath.io"
    ports: frozenset[int] = frozenset({443})
    protocols: frozenset[Protocol] = frozenset({Protocol.TLS, Protocol.HTTP})
    workloads: WorkloadSelector = field(default_factory=WorkloadSelector)
    http: HttpMatch | None = None
    expires: float | None = None  # POSIX seconds; a rule past it is not applied
    expires_text: str | None = None  # as written, for explanations
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class NamespacePolicy:
    """One policy ConfigMap, validated."""

    source: ConfigMapRef
    tier: Tier
    mode: Mode
    rules: tuple[Rule, ...]
    deny: tuple[str, ...] = ()  # cluster tier only: host patterns nobody may reach
    resource_version: str = ""
    uid: str = ""

    @property
    def namespace(self) -> str:
        return self.source.namespace


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Every accepted policy at one moment; `revision` grows on each change."""

    policies: tuple[NamespacePolicy, ...]
    revision: int = 0


# --------------------------------------------------------------------------
# The answer


@dataclass(frozen=True, slots=True)
class RuleCheck:
    """Why one candidate rule did or did not apply."""

    rule: str  # "namespace/configmap/rule"
    matched: bool
    why: str
    owner: str | None = None


@dataclass(slots=True)
class Decision:
    allowed: bool  # what Envoy is told
    verdict: Verdict
    reason: Reason
    decision_id: str
    revision: int
    rule: str | None = None  # "namespace/configmap/rule" that allowed (or would have)
    owner: str | None = None
    host: str = ""  # normalised destination host ("" when none could be read)
    namespace: str = ""  # from the principal
    service_account: str = ""
    mode: Mode = Mode.ENFORCE
    message: str = ""  # one human sentence on the reason
    policy_source: str | None = None  # ConfigMap to edit, "namespace/name"
    # Deny and audit verdicts carry a way to explain them. Explaining walks
    # the nearby rules, which costs more than the decision itself, so it runs
    # only when somebody asks (the recorder, off the Check path; `check`).
    explainer: Callable[[], tuple[RuleCheck, ...]] | None = field(default=None, repr=False)
    _explanation: tuple[RuleCheck, ...] | None = field(default=None, repr=False)

    @property
    def explanation(self) -> tuple[RuleCheck, ...]:
        """The rules considered and why each did or did not apply (empty for allows)."""
        if self._explanation is None:
            self._explanation = self.explainer() if self.explainer is not None else ()
        return self._explanation

    @property
    def workload(self) -> str:
        return f"{self.namespace}/{self.service_account}" if self.namespace else ""
