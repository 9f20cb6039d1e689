"""Bounding what is recorded, before anything is stored, logged or traced.

Every field of a DecisionRecord that a caller controls (host, SNI, Host
header, path, method, principal, source address, the trace headers, and the
message and explanations that quote them) is cut to a fixed size here, and a
path's query string loses its values, as the first step of
`DecisionRecorder.record()`. The ring, the decision log, spans and the admin
API then only ever see the bounded copy: a 16 KB Host costs a stored
decision 256 characters, and `/v1/report?api_key=sk_live_...` is kept as
`/v1/report?api_key`.

The check is a handful of `len()` calls; a record with nothing to cut is
returned as is (the common case costs well under a microsecond).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..model import Destination, Identity, RuleCheck
from ..records import DecisionRecord

ELLIPSIS = "..."  # ASCII: one "…" would make the whole string 2 bytes a character


@dataclass(frozen=True, slots=True)
class RecordLimits:
    """Maximum sizes, in characters, of recorded fields (docs/tracing.md, "Bounds")."""

    host: int = 260
    """host, SNI and Host header: a DNS name (253) with a `:port` is never cut."""
    not_a_host: int = 64
    """what is kept of a host, SNI or Host header longer than `host`: it cannot be a
    name, and 64 characters are enough to recognise it."""
    path: int = 256
    """the HTTP path, after the query string's values are dropped."""
    principal: int = 256
    """the peer principal (a SPIFFE URI)."""
    name: int = 128
    """namespace, service account (from the principal), source address, method."""
    message: int = 256
    """the decision's message and each explanation's `why`."""
    explanation: int = 32
    """rules kept in an explanation; the rest are summed up in one last entry."""
    trace_header: int = 512
    """traceparent (valid ones are 55) and tracestate (W3C: 512)."""
    keep_query_values: bool = False
    """Keep a path's query values (`?api_key=...`): off, they are often secrets."""


DEFAULT_LIMITS = RecordLimits()


def cut(text: str, limit: int) -> str:
    """`text` if it fits, else its first characters and "...", `limit` in all."""
    if len(text) <= limit:
        return text
    return text[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS


def _cut_opt(text: str | None, limit: int) -> str | None:
    return text if text is None or len(text) <= limit else cut(text, limit)


def strip_query(path: str) -> str:
    """'/v1/report?api_key=sk&x=1#f' -> '/v1/report?api_key&x': parameter names only."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    query = query.partition("#")[0]
    names = [part.partition("=")[0] for part in query.split("&") if part]
    return f"{base}?{'&'.join(names)}" if names else base


def bound_record(rec: DecisionRecord, limits: RecordLimits = DEFAULT_LIMITS) -> DecisionRecord:
    """`rec` with every caller-controlled field within `limits`; `rec` itself when
    nothing needs cutting (nothing is changed in place: the gRPC server's values
    stay as they were)."""
    d, ident, dest = rec.decision, rec.identity, rec.destination
    lh, ln = limits.host, limits.name
    path = dest.path if dest is not None else None
    query = path is not None and not limits.keep_query_values and "?" in path
    if not (
        query
        or len(d.host) > lh
        or len(d.message) > limits.message
        or len(d.namespace) > ln
        or len(d.service_account) > ln
        or (
            ident is not None
            and (len(ident.principal) > limits.principal or len(ident.source_ip) > ln)
        )
        or (
            dest is not None
            and (
                (dest.sni is not None and len(dest.sni) > lh)
                or (dest.http_host is not None and len(dest.http_host) > lh)
                or (path is not None and len(path) > limits.path)
                or (dest.method is not None and len(dest.method) > ln)
            )
        )
        or (rec.traceparent is not None and len(rec.traceparent) > limits.trace_header)
        or (rec.tracestate is not None and len(rec.tracestate) > limits.trace_header)
    ):
        return rec
    return _bound_slow(rec, limits)


def _bound_slow(rec: DecisionRecord, limits: RecordLimits) -> DecisionRecord:
    d, ident, dest = rec.decision, rec.identity, rec.destination
    lh, ln = limits.host, limits.name
    replacements: list[tuple[str, str]] = []  # raw text -> recorded text, for messages
    lnh = limits.not_a_host
    host = d.host if len(d.host) <= lh else cut(d.host, lnh)
    if host is not d.host:
        replacements.append((d.host, host))
    new_dest = dest
    if dest is not None:
        path = dest.path
        if path is not None:
            clean = path if limits.keep_query_values else strip_query(path)
            clean = cut(clean, limits.path)
            if clean != path:
                replacements.append((path, clean))
            path = clean

        shared: dict[str, str] = {host: host}

        def same_or_cut(value: str | None) -> str | None:
            # SNI and Host usually name the same thing: store one string for both.
            if value is None or len(value) <= lh:
                return value
            short = cut(value, lnh)
            return shared.setdefault(short, short)

        new_dest = Destination(
            port=dest.port,
            protocol=dest.protocol,
            sni=same_or_cut(dest.sni),
            http_host=same_or_cut(dest.http_host),
            method=_cut_opt(dest.method, ln),
            path=path,
        )
        for raw, new in ((dest.sni, new_dest.sni), (dest.http_host, new_dest.http_host)):
            if raw is not None and new is not None and raw is not new and raw != d.host:
                replacements.append((raw, new))
    new_ident = ident
    if ident is not None:
        new_ident = Identity(
            principal=cut(ident.principal, limits.principal),
            source_ip=cut(ident.source_ip, ln),
            workload=ident.workload,
        )
    fixed = _scrubber(replacements, limits.message)
    new_decision = replace(
        d,
        host=host,
        namespace=cut(d.namespace, ln),
        service_account=cut(d.service_account, ln),
        message=fixed(d.message),
    )
    out = DecisionRecord(
        decision=new_decision,
        identity=new_ident,
        destination=new_dest,
        start_unix_ns=rec.start_unix_ns,
        duration_ns=rec.duration_ns,
        traceparent=_cut_opt(rec.traceparent, limits.trace_header),
        tracestate=_cut_opt(rec.tracestate, limits.trace_header),
        filter=rec.filter,
    )
    if d.explainer is not None:
        new_decision.explainer = _explainer(d.explainer, fixed, limits)
    return out


def _scrubber(replacements: list[tuple[str, str]], limit: int) -> Callable[[str], str]:
    """A function putting the recorded form of raw fields into a text, then cutting it."""
    # Longest first, so that a path is replaced before a host it contains.
    pairs = sorted(replacements, key=lambda p: -len(p[0]))

    def fix(text: str) -> str:
        for raw, new in pairs:
            if raw and raw in text:
                text = text.replace(raw, new)
        return cut(text, limit)

    return fix


def bound_explanation(
    checks: tuple[RuleCheck, ...],
    limits: RecordLimits = DEFAULT_LIMITS,
    fix: Callable[[str], str] | None = None,
) -> tuple[RuleCheck, ...]:
    """At most `limits.explanation` rules, each `why` within `limits.message`.

    Idempotent, so the recorder (which stores the result) and the admin
    endpoint (which may read a record before the recorder got to it) both apply it.
    """
    fix = fix or _scrubber([], limits.message)
    most = limits.explanation
    if len(checks) <= most and all(len(c.why) <= limits.message for c in checks):
        return checks
    kept = tuple(RuleCheck(c.rule, c.matched, fix(c.why), c.owner) for c in checks[:most])
    if len(checks) > most:
        kept += (RuleCheck(ELLIPSIS, False, f"{len(checks) - most} more rules not shown"),)
    return kept


def _explainer(
    explain: Callable[[], tuple[RuleCheck, ...]], fix: Callable[[str], str], limits: RecordLimits
) -> Callable[[], tuple[RuleCheck, ...]]:
    """The raw explanation with the recorded form of raw fields put in."""

    def bounded() -> tuple[RuleCheck, ...]:
        checks = explain()
        return bound_explanation(
            tuple(RuleCheck(c.rule, c.matched, fix(c.why), c.owner) for c in checks),
            limits,
            fix,
        )

    return bounded
