"""Host names: normalisation and the one wildcard dialect (Istio's).

Used on both sides of a decision: the policy parser turns written host
patterns into canonical ones, the engine turns the SNI / Host it sees into a
canonical name, and the ServiceEntry renderer emits the same patterns, so the
mesh registry and the decisions always agree on what a host means.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from types import MappingProxyType

import idna
from publicsuffixlist import PublicSuffixList

from .echo import shown
from .model import Reason

MAX_NAME = 253
MAX_LABEL = 63
_MAX_RAW = 4 * MAX_NAME  # generous room for Unicode and a port before IDNA
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")


class HostError(ValueError):
    """A name that cannot be decided on; `reason` is invalid-host or ip-literal."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class PatternError(ValueError):
    """A host pattern in a policy that is not in the dialect."""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _canonical(name: str) -> str:
    """Lower-case, drop one trailing dot, IDNA-encode, and check DNS syntax.

    Raises HostError. `name` has no port and no brackets any more.
    """
    if not name:
        raise HostError(Reason.INVALID_HOST, "empty host name")
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise HostError(Reason.INVALID_HOST, f"not a valid internationalised name: {e}") from e
    name = name.lower()
    if _is_ip(name):
        raise HostError(Reason.IP_LITERAL, f"{shown(name)} is an IP address literal, not a name")
    if len(name) > MAX_NAME:
        raise HostError(
            Reason.INVALID_HOST, f"name is {len(name)} characters long, over {MAX_NAME}"
        )
    labels = name.split(".")
    for label in labels:
        if not label:
            raise HostError(Reason.INVALID_HOST, f"{shown(name)} has an empty label")
        if len(label) > MAX_LABEL:
            raise HostError(
                Reason.INVALID_HOST, f"label {label[:20]!r}... is over {MAX_LABEL} characters"
            )
        if not _LABEL.match(label):
            raise HostError(
                Reason.INVALID_HOST,
                f"{shown(name)}: label {shown(label)} may hold only letters, digits and inner '-'",
            )
        if label.startswith("xn--") and not _valid_a_label(label):
            raise HostError(
                Reason.INVALID_HOST,
                f"{shown(name)}: label {shown(label)} is not a valid IDNA A-label (punycode)",
            )
    # A last label of digits or of 0x-hex makes the whole name an IPv4 address
    # to libc's inet_aton and to the WHATWG URL parser, in any of their forms
    # (127.1, 2130706433, 0x7f000001, 0177.0.0.1, 127.0.0.0x1): no TLD looks
    # like that, so such a "name" only ever reaches an address.
    if _NUMERIC_LABEL.match(labels[-1]):
        raise HostError(
            Reason.IP_LITERAL, f"{shown(name)} is a numeric IPv4 address form, not a name"
        )
    return name


@functools.lru_cache(maxsize=4096)
def _valid_a_label(label: str) -> bool:
    """Whether an `xn--` label decodes to a valid IDNA 2008 U-label that encodes back
    to exactly this label (else two spellings could name one host, or none)."""
    try:
        return idna.alabel(idna.ulabel(label)).decode("ascii") == label
    except (idna.IDNAError, UnicodeError, ValueError):
        return False


@functools.lru_cache(maxsize=16384)
def _normalize_cached(raw: str, with_port: bool) -> tuple[str, int | None, Reason | None, str]:
    try:
        name, port = split_and_normalize(raw, with_port=with_port)
    except HostError as e:
        return "", None, e.reason, e.message
    return name, port, None, ""


def split_and_normalize(raw: str, *, with_port: bool) -> tuple[str, int | None]:
    """Canonical name and explicit port of an SNI (`with_port=False`, never a
    port) or a Host header (`with_port=True`, `name[:port]`). Uncached."""
    port: int | None = None
    if with_port:
        if raw.startswith("["):
            close = raw.find("]")
            inner = raw[1:close] if close > 0 else raw[1:]
            if close > 0 and _is_ip(inner):
                raise HostError(Reason.IP_LITERAL, f"{raw!r} is a bracketed IPv6 literal")
            raise HostError(Reason.INVALID_HOST, f"{raw!r} is not a valid bracketed address")
        if raw.count(":") == 1:
            raw, port_text = raw.split(":")
            if not _PORT.match(port_text) or not 0 < int(port_text) <= 65535:
                raise HostError(
                    Reason.INVALID_HOST, f"port {port_text!r} in Host is not a number 1-65535"
                )
            port = int(port_text)
    if ":" in raw:
        if _is_ip(raw):
            raise HostError(Reason.IP_LITERAL, f"{raw!r} is an IPv6 literal")
        raise HostError(Reason.INVALID_HOST, f"{raw!r} holds ':' where no port may be")
    return _canonical(raw), port


def normalize(raw: str, *, with_port: bool = False) -> str:
    """Canonical host name; raises HostError (invalid-host or ip-literal).

    Cached: the same few external hosts are asked for over and over.
    """
    name, _, reason, message = normalize_or_reason(raw, with_port=with_port)
    if reason is not None:
        raise HostError(reason, message)
    return name


def normalize_or_reason(
    raw: str, *, with_port: bool = False
) -> tuple[str, int | None, Reason | None, str]:
    """Without exceptions: (name, port, None, "") or ("", None, reason, message)."""
    if len(raw) > _MAX_RAW:  # never let hostile giants into the cache
        return "", None, Reason.INVALID_HOST, f"host is {len(raw)} characters long, over {MAX_NAME}"
    return _normalize_cached(raw, with_port)


@functools.lru_cache(maxsize=16384)
def parent_suffixes(name: str) -> tuple[str, ...]:
    """Every proper parent of a name, most specific first.

    'a.b.kadath.io' -> ('b.kadath.io', 'kadath.io', 'io'). A wildcard '*.X'
    matches a name exactly when X is among these.
    """
    out = []
    dot = name.find(".")
    while dot >= 0:
        out.append(name[dot + 1 :])
        dot = name.find(".", dot + 1)
    return tuple(out)


def parse_pattern(raw: str, *, allow_any: bool = False) -> str:
    """Canonical form of a host pattern written in a policy; raises PatternError.

    `api.kadath.io` (exact) or `*.kadath.io` (any name below kadath.io, at any
    depth, never kadath.io itself). `*` alone only where `allow_any`.
    """
    if not isinstance(raw, str):
        raise PatternError(f"must be a string, not {type(raw).__name__}")
    if len(raw) > _MAX_RAW:  # before IDNA: its cost grows with the input
        raise PatternError(f"is {len(raw)} characters long, over {MAX_NAME}")
    if raw == "*":
        if allow_any:
            return "*"
        raise PatternError(
            "a bare '*' would allow every host; name the hosts, or use '*.example.com'"
        )
    rest = raw
    wildcard = raw.startswith("*.")
    if wildcard:
        rest = raw[2:]
    if "*" in rest:
        raise PatternError("'*' may only be the whole leftmost label, as in '*.example.com'")
    if ":" in rest or "/" in rest or "@" in rest:
        raise PatternError("a host pattern is a name only: no scheme, port, path or userinfo")
    try:
        name = _canonical(rest)
    except HostError as e:
        if e.reason is Reason.IP_LITERAL:
            raise PatternError("IP addresses are not allowed; name the host") from e
        raise PatternError(e.message) from e
    return "*." + name if wildcard else name


def is_wildcard(pattern: str) -> bool:
    return pattern.startswith("*.")


def wildcard_key(pattern: str) -> str:
    """The suffix a wildcard pattern is indexed under: '*.kadath.io' -> 'kadath.io'."""
    return pattern[2:]


def matches(pattern: str, name: str) -> bool:
    """Whether a canonical pattern matches a canonical name."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return pattern == name


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    # The package's bundled snapshot of the Mozilla Public Suffix List: no
    # network at run time (upgrading the pinned package refreshes it). Both the
    # ICANN and the private section count, see public_suffix_problem.
    # accept_unknown=False: a TLD missing from the list is not called public
    # here; whole TLDs are refused by their shape instead.
    return PublicSuffixList(accept_unknown=False)


# Names every resolver answers with a loopback address: `localhost` and all names
# under it (RFC 6761, section 6.3) and the aliases Kubernetes writes into every
# pod's /etc/hosts. Through the egress gateway they reach the gateway itself.
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost",
                             "ip6-loopback"})


def loopback_problem(pattern: str) -> str | None:
    """Why a canonical pattern names the loopback interface, or None."""
    name = wildcard_key(pattern) if is_wildcard(pattern) else pattern
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return (f"'{pattern}' names the loopback interface (RFC 6761): through the "
                "gateway it would reach the gateway itself, not an external host")
    return None


DEFAULT_CLUSTER_DOMAIN = "cluster.local"

# Top-level names under which no external service lives, and why. From the IANA
# Special-Use Domain Names registry (RFC 6761 and later) and ICANN's reservation of
# `internal`, plus the private names ICANN found in wide use and never delegated
# (name-collision study: corp, home, mail) and the usual LAN ones. A name below
# one is answered by the cluster's, the cloud's or the LAN's resolver, or nobody's:
# through the gateway it reaches an internal endpoint, never the internet. `arpa` is
# whole: every name in it is infrastructure (in-addr.arpa and ip6.arpa reverse maps,
# home.arpa). `example` and `test` are special-use too but stay allowed: they never
# resolve publicly, and documentation and tests use them for made-up external hosts.
_INTERNAL_TLDS = MappingProxyType({
    "local": "multicast DNS, hosts on the gateway's own network (RFC 6762)",
    "internal": "reserved by ICANN for private networks; clouds name their metadata "
                "servers under it, as metadata.google.internal",
    "arpa": "DNS infrastructure, reverse lookups in in-addr.arpa and ip6.arpa, home "
            "networks in home.arpa (RFC 8375)",
    "svc": "a Kubernetes service short of the cluster domain, name.namespace.svc, "
           "which the resolver's search path completes",
    "invalid": "a name that never resolves (RFC 6761)",
    "onion": "Tor onion services (RFC 7686)",
    "alt": "names outside the DNS (RFC 9476)",
    **{tld: "a private network name that is never delegated publicly"
       for tld in ("intranet", "lan", "corp", "home", "mail", "private", "localdomain")},
})
_DOCUMENTATION_TLDS = frozenset({"example", "test"})


def parse_cluster_domain(raw: str) -> str:
    """Canonical form of a cluster DNS domain (`cluster.local`); raises PatternError."""
    if raw.startswith("*"):
        raise PatternError("is a domain such as cluster.local, not a wildcard")
    return parse_pattern(raw)


@functools.lru_cache(maxsize=16384)
def internal_problem(pattern: str, cluster_domain: str = DEFAULT_CLUSTER_DOMAIN) -> str | None:
    """Why a canonical pattern can name a cluster-internal or special-use host, or None.

    The answer completes a sentence whose subject is the pattern ("is under ...").
    Allowed through the egress gateway, such a name makes the gateway call, from its
    own network position and with its own identity, an in-cluster service, a cloud
    metadata server or a LAN host for the workload: server-side request forgery.
    `cluster_domain` is the cluster's DNS domain (`--cluster-domain`). Called at load
    time only; a wildcard is refused when any name it matches is internal.
    """
    wildcard = is_wildcard(pattern)
    name = wildcard_key(pattern) if wildcard else pattern
    if pattern == "*":
        return None  # only a cluster deny may say `*`
    if name == cluster_domain or name.endswith("." + cluster_domain):
        return f"is under the cluster DNS domain {cluster_domain} (Kubernetes services and pods)"
    if wildcard and cluster_domain.endswith("." + name):
        return (f"covers the cluster DNS domain {cluster_domain} "
                "(every Kubernetes service and pod)")
    if not wildcard and "." not in name:
        # The gateway pod's resolver tries its search domains (namespace.svc.DOMAIN,
        # svc.DOMAIN, DOMAIN) first: `kubernetes` is the API server, `metadata` the
        # cloud's metadata server.
        return "is a single-label name, which the resolver completes with the cluster's domains"
    top = name.rpartition(".")[2]
    why = _INTERNAL_TLDS.get(top)
    if why is not None:
        return f"is under {top}, a special-use name: {why}"
    if top not in _DOCUMENTATION_TLDS and not _public_suffixes().is_public(top):
        # Not a TLD of the public root, so only the cluster's resolver can answer,
        # by its search path: `kubernetes.default` is the API server.
        return (f"is under {top}, which is no public top-level domain (Public Suffix List): "
                "only the cluster's resolver answers for it, as for name.namespace, a "
                "Kubernetes service")
    return None


def public_suffix_problem(pattern: str) -> str | None:
    """Why a canonical wildcard pattern is over-wide, or None.

    `*.X` is over-wide when X is a whole top-level domain (`*.com`, also an
    unlisted one such as `*.internal`) or a public suffix: an ICANN one
    (`co.uk`) or a private one (`github.io`, `s3.amazonaws.com`). Private
    entries are the shared platforms where anyone can register a name below,
    so a wildcard over one allows any stranger's endpoint: an exfiltration
    path, not an integration.
    """
    if not is_wildcard(pattern):
        return None
    suffix = wildcard_key(pattern)
    if "." not in suffix:
        return f"'{pattern}' covers the whole top-level domain {suffix}"
    if _public_suffixes().is_public(suffix):
        return (
            f"{suffix} is a public suffix (Mozilla Public Suffix List): '{pattern}' "
            "would allow every site anyone registers under it"
        )
    return None
