"""What every importer produces: draft rules, draft denies, and one note per source element.

The importers (one module per source system) read foreign policy objects and
describe, in these values, what our policy language can say of them. Nothing
here widens: a note records for every source element whether it was
translated exactly, translated narrower, or not translated, and why. The
emitter (emit.py) turns drafts into ConfigMaps and validates them with the
same parser `lint` uses.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import hosts

if TYPE_CHECKING:  # inputs imports this module
    from .inputs import Document

CLUSTER = ""  # DraftRule.namespace for the cluster tier
# Ports our gateway sees for names nobody pinned to a port (AWS, Squid without
# a port ACL, wide ranges): a subset of "any port", so narrower, never wider.
DEFAULT_TLS_PORT = 443
DEFAULT_HTTP_PORT = 80
COMMON_PORTS = (80, 443, 8080, 8443)
MAX_LISTED_PORTS = 64  # wider ranges are narrowed to COMMON_PORTS inside them
MAX_SOURCE_TEXT = 200  # how much of a hostile source string a note echoes


class Outcome(enum.StrEnum):
    """What became of one source element: the report's public vocabulary."""

    EXACT = "exact"
    NARROWER = "narrower"
    DROPPED = "not-translatable"


@dataclass(eq=False)
class Note:
    """One source element and its fate. `targets` are the (draft, host pattern)
    pairs it produced; the emitter re-grades the note when validation drops
    some of them, and fills `rules` with where the survivors went."""

    element: str  # where in the source, e.g. 'shop/web egress[0] toFQDNs[1] matchPattern "*.x.io"'
    outcome: Outcome
    reason: str = ""
    targets: list[tuple[DraftRule | DraftDeny, str]] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    anchor: tuple[str, str] | None = None  # (namespace, configmap) whose comments list it


@dataclass(eq=False)
class DraftRule:
    """An allow rule before validation. `namespace` CLUSTER = the cluster tier."""

    namespace: str
    configmap: str
    name: str
    hosts: list[str]
    ports: list[int]
    protocols: list[str] | None = None  # None = both
    workloads: dict[str, Any] | None = None
    methods: list[str] | None = None
    dropped: dict[str, str] = field(default_factory=dict)  # host pattern -> why


@dataclass(eq=False)
class DraftDeny:
    """Hosts for the cluster tier's `deny`, which beats every allow."""

    configmap: str
    hosts: list[str]
    dropped: dict[str, str] = field(default_factory=dict)


@dataclass
class Translation:
    rules: list[DraftRule] = field(default_factory=list)
    denies: list[DraftDeny] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)  # every note, in source order
    # Host regions the source denies that we could not emit as a deny: every
    # allow overlapping one of them is narrowed away (see narrow_by_denials).
    unexpressed_denials: list[str] = field(default_factory=list)

    def note(
        self,
        element: str,
        outcome: Outcome,
        reason: str = "",
        anchor: tuple[str, str] | None = None,
    ) -> Note:
        n = Note(element, outcome, reason, anchor=anchor)
        self.notes.append(n)
        return n

    def allow(self, rule: DraftRule, pattern: str, note: Note) -> None:
        """`note`'s element allows `pattern` through `rule`."""
        if pattern not in rule.hosts:
            rule.hosts.append(pattern)
        note.targets.append((rule, pattern))

    def deny(self, deny: DraftDeny, pattern: str, note: Note) -> None:
        if pattern not in deny.hosts:
            deny.hosts.append(pattern)
        note.targets.append((deny, pattern))


class ImportError_(ValueError):
    """Input that cannot be read at all (not a file, bad YAML); one line."""


# --------------------------------------------------------------------------
# Text from the source: echoed only short and on one line.


def shown(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > MAX_SOURCE_TEXT:
        text = text[:MAX_SOURCE_TEXT] + "..."
    return text


def one_line(text: str) -> str:
    """Our own messages (which quote source text only through shown()): one line, whole."""
    return "".join(c if c.isprintable() else "?" for c in text)


def as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def objects_of_kind(
    t: Translation, docs: Iterable[Document], kinds: tuple[str, ...], why_not: str
) -> Iterator[dict[str, Any]]:
    """The objects whose kind is one of `kinds`; every other one gets a DROPPED note."""
    for doc in docs:
        obj = as_map(doc.obj)
        if obj.get("kind") not in kinds:
            t.note(f"{doc.origin} kind {shown(obj.get('kind'))}", Outcome.DROPPED, why_not)
            continue
        yield obj


def as_int(value: Any, default: int = 0) -> int:
    """An integer from a hostile field (a number or digits), else `default`."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit() and len(value) < 10:
        return int(value)
    return default


# --------------------------------------------------------------------------
# Names we generate for ConfigMaps and rules.

_RULE_BAD = re.compile(r"[^A-Za-z0-9_.-]+")
_CM_BAD = re.compile(r"[^a-z0-9]+")  # ConfigMap names: DNS labels joined by "-"
NAMESPACE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def rule_name(*parts: Any) -> str:
    """A rule name (1-63 of A-Za-z0-9-_., alphanumeric ends) built from parts."""
    raw = "-".join(str(p) for p in parts if str(p))
    name = _RULE_BAD.sub("-", raw).strip("-_.") or "rule"
    if len(name) > 63 or name != raw:
        name = f"{name[:54].strip('-_.')}-{_short_hash(raw)}"
    return name


def configmap_name(source: str, *parts: Any) -> str:
    raw = "-".join(["import", source, *(str(p) for p in parts if str(p))])
    name = _CM_BAD.sub("-", raw.lower()).strip("-") or "import"
    if len(name) > 200:
        name = f"{name[:190].strip('-')}-{_short_hash(raw)}"
    return name


# --------------------------------------------------------------------------
# Host patterns in our dialect: exact names and "*.suffix" (any depth, apex
# excluded). Set operations here are exact, so callers can reason about
# narrowing without guessing.


def canonical(pattern: str) -> str | None:
    """Our canonical pattern, or None when our dialect refuses it."""
    try:
        return hosts.parse_pattern(pattern)
    except hosts.PatternError:
        return None


def covers(outer: str, inner: str) -> bool:
    """Every name `inner` matches is matched by `outer`."""
    if outer == "*":
        return True
    if inner == "*":
        return False
    if hosts.is_wildcard(outer):
        suffix = hosts.wildcard_key(outer)
        if hosts.is_wildcard(inner):
            key = hosts.wildcard_key(inner)
            return key == suffix or key.endswith("." + suffix)
        return hosts.matches(outer, inner)
    return outer == inner


def overlaps(a: str, b: str) -> bool:
    """Some name is matched by both patterns."""
    if not hosts.is_wildcard(a) and not hosts.is_wildcard(b) and a != "*" and b != "*":
        return a == b
    return covers(a, b) or covers(b, a)


def intersect(a: str, b: str) -> str | None:
    if covers(a, b):
        return b
    if covers(b, a):
        return a
    return None


def wildcard_over_tld(pattern: str) -> bool:
    """`*.com`: a wildcard over a single label, which allows a whole top-level domain."""
    return hosts.is_wildcard(pattern) and "." not in hosts.wildcard_key(pattern)


# --------------------------------------------------------------------------
# Kubernetes label selectors -> our `workloads` selector.

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def workloads_from_selector(
    selector: Any, *, strip_prefixes: tuple[str, ...] = ()
) -> tuple[dict[str, Any] | None, str]:
    """(our `workloads` map or None for every pod, problem or "").

    `strip_prefixes` drops source-specific key prefixes such as Cilium's
    `k8s:`. A selector we cannot carry over is a problem: the caller drops the
    rule rather than widening it to every pod.
    """
    if selector is None:
        return None, ""
    if not isinstance(selector, dict):
        return None, f"selector is not a map: {shown(selector)}"
    unknown = set(selector) - {"matchLabels", "matchExpressions"}
    if unknown:
        return None, f"selector fields {sorted(unknown)} are not label selectors"

    def key_of(k: Any) -> str:
        text = str(k)
        for prefix in strip_prefixes:
            if text.startswith(prefix):
                return text[len(prefix) :]
        return text

    out: dict[str, Any] = {}
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, dict):
        return None, "matchLabels is not a map"
    if labels:
        out["matchLabels"] = {key_of(k): str(v) if v is not None else "" for k, v in labels.items()}
    exprs = selector.get("matchExpressions") or []
    if not isinstance(exprs, list):
        return None, "matchExpressions is not a list"
    converted = []
    for expr in exprs:
        if not isinstance(expr, dict) or expr.get("operator") not in _OPERATORS:
            return None, f"matchExpressions entry {shown(expr)} is not a label requirement"
        item: dict[str, Any] = {"key": key_of(expr.get("key")), "operator": expr["operator"]}
        if expr["operator"] in ("In", "NotIn"):
            item["values"] = [str(v) for v in as_list(expr.get("values"))]
        converted.append(item)
    if converted:
        out["matchExpressions"] = converted
    return (out or None), ""


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics, for selecting Namespace objects."""
    for k, v in as_map(selector.get("matchLabels")).items():
        if labels.get(str(k)) != str(v):
            return False
    for expr in as_list(selector.get("matchExpressions")):
        expr = as_map(expr)
        key, op = str(expr.get("key")), expr.get("operator")
        values = {str(v) for v in as_list(expr.get("values"))}
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
        if op not in _OPERATORS:
            return False
    return True


# --------------------------------------------------------------------------
# Ports


def port_list(start: int, end: int) -> tuple[list[int], bool]:
    """Ports start..end as a list we can write, and whether it was narrowed."""
    if end - start + 1 <= MAX_LISTED_PORTS:
        return list(range(start, end + 1)), False
    return [p for p in COMMON_PORTS if start <= p <= end], True


# --------------------------------------------------------------------------
# Denials we could not write down take their overlap away from every allow.


def narrow_by_denials(translation: Translation, denied: Iterable[str]) -> None:
    """Drop every allowed host pattern that overlaps a denied region.

    Used where the source denies names we cannot emit as a cluster `deny`
    (or where a deny would not beat the source's ordering): removing the
    overlap from the allows keeps the result at or below the source.
    """
    regions = [d for d in denied if d]
    if not regions:
        return
    for rule in translation.rules:
        for pattern in rule.hosts:
            hit = next((d for d in regions if overlaps(d, pattern)), None)
            if hit is not None and pattern not in rule.dropped:
                rule.dropped[pattern] = (
                    f"the source denies {shown(hit)}, which overlaps {pattern}, and an allow "
                    "rule cannot subtract it"
                )
