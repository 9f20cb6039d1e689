"""Who is calling: the mTLS principal and the Pod behind the source address.

The stage between request parsing and the decision. `IdentityResolver` turns
the raw principal and socket peer address into an Identity (finding the Pod
by address); `verify` then says who the caller is, or why it cannot be
trusted: a principal outside the trust domain, a Pod of another namespace or
service account at the address (a certificate used from the wrong Pod), or no
Pod at all at an address where every caller must be one.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from collections.abc import Callable

from .model import Identity, Reason, Workload

WorkloadLookup = Callable[[str], Workload | None]


class UnknownWorkloads(enum.StrEnum):
    """What a caller whose source address belongs to no known Pod gets (serve
    --unknown-workloads). DENY: in a mesh whose gateway sees Pod IPs, such a
    caller holds a certificate outside its Pod. ALLOW: for meshes whose source
    addresses are not Pod IPs (SNAT, multi-cluster); the principal alone then
    identifies the caller and rules that select by label do not apply."""

    DENY = "deny"
    ALLOW = "allow"


# --------------------------------------------------------------------------
# Addresses


# The longest address text worth parsing: full IPv6 with an embedded IPv4
# (45 characters) and room for a zone. Longer text is no address, and is
# never parsed, cached or echoed whole.
MAX_ADDRESS_CHARS = 64


def canonical_ip(text: str) -> str | None:
    """One spelling per address, or None when `text` is not one.

    IPv6 in RFC 5952 form (`fd00::0001` -> `fd00::1`), IPv4-mapped IPv6
    (`::ffff:10.0.0.1`, `::ffff:a00:1`) as the IPv4 address it carries, so that
    an address written one way by the API server and another by Envoy is one
    key.
    """
    return _canonical_ip(text) if len(text) <= MAX_ADDRESS_CHARS else None


@functools.lru_cache(maxsize=4096)  # peers repeat; entries are short (MAX_ADDRESS_CHARS)
def _canonical_ip(text: str) -> str | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


# --------------------------------------------------------------------------
# Principals

_SPIFFE_PATH = re.compile(
    r"/ns/([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)/sa/([a-z0-9][-a-z0-9.]{0,252})\Z"
)


@functools.lru_cache(maxsize=4096)
def parse_principal(principal: str, trust_domain: str) -> tuple[str, str, str]:
    """SPIFFE URI -> (namespace, service account, "") or ("", "", why not)."""
    prefix = f"spiffe://{trust_domain}/"
    if not principal:
        return "", "", "no mTLS peer principal (is the gateway listener requiring client certs?)"
    if not principal.startswith(prefix):
        shown = principal if len(principal) <= 200 else principal[:200] + "..."
        return "", "", f"principal {shown!r} is not a SPIFFE id in trust domain {trust_domain!r}"
    m = _SPIFFE_PATH.match(principal, len(prefix) - 1)
    if not m:
        return (
            "",
            "",
            f"principal {principal[:200]!r} is not of the form "
            f"spiffe://{trust_domain}/ns/NAMESPACE/sa/ACCOUNT",
        )
    return m.group(1), m.group(3), ""


# --------------------------------------------------------------------------
# Resolving and verifying


class IdentityResolver:
    """principal + source address -> Identity, with the Pod found at the address.

    Built once per server. With no lookup (no Pod source configured) nothing
    is found and nothing is required; with one, `unknown` says whether a
    caller at an address no Pod has is refused.
    """

    __slots__ = ("_lookup", "_require")

    def __init__(
        self, lookup: WorkloadLookup | None, unknown: UnknownWorkloads = UnknownWorkloads.DENY
    ) -> None:
        self._lookup = lookup
        self._require = lookup is not None and unknown is UnknownWorkloads.DENY

    @property
    def requires_pod(self) -> bool:
        return self._require

    def __call__(self, principal: str, source_ip: str) -> Identity:
        lookup = self._lookup
        workload = lookup(source_ip) if lookup is not None and source_ip else None
        return Identity(principal, source_ip, workload, self._require)


def verify(identity: Identity, trust_domain: str) -> tuple[str, str, Reason | None, str]:
    """(namespace, service account, None, "") of a caller that can be trusted,
    else (namespace, account, reason, message) with what is known of it."""
    namespace, account, why = parse_principal(identity.principal, trust_domain)
    if why:
        return "", "", Reason.UNTRUSTED_IDENTITY, why
    workload = identity.workload
    if workload is None:
        if identity.pod_required:
            return namespace, account, Reason.UNKNOWN_WORKLOAD, (
                f"no Pod is known at source address {_shown(identity.source_ip)}, "
                f"but the certificate says {namespace}/{account}: a mesh certificate is only "
                "honoured from its own Pod"
            )
    elif workload.namespace != namespace or workload.service_account != account:
        return namespace, account, Reason.IDENTITY_MISMATCH, (
            f"source {_shown(identity.source_ip)} is Pod {workload.namespace}/{workload.name} "
            f"(service account {workload.service_account}), but the certificate says "
            f"{namespace}/{account}"
        )
    return namespace, account, None, ""


def _shown(address: str) -> str:
    if not address:
        return "(none)"
    return address if len(address) <= MAX_ADDRESS_CHARS else address[:MAX_ADDRESS_CHARS] + "..."
