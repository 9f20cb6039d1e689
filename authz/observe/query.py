"""Filters over recorded decisions: the admin API's query string, and `since`.

Shared by the admin endpoint, the page's views and the CLI (which checks
`--since` before asking).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from ..model import Reason, Verdict
from ..records import DecisionRecord

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000  # the list's largest page: larger asks get this many (and say so)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_FILTERS = frozenset({"namespace", "workload", "host", "verdict", "reason", "since", "limit"})
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class QueryError(ValueError):
    """A filter the caller got wrong: answered with 400 and this message."""


def parse_duration(text: str) -> float:
    """'90s', '10m', '1h30m', '2d' -> seconds."""
    text = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise QueryError(f"bad duration {text!r}: use e.g. 30s, 10m, 1h30m, 2d")
    return total


def parse_since(text: str, now: float | None = None) -> int:
    """A duration back from now, or an RFC 3339 time -> unix nanoseconds."""
    now = time.time() if now is None else now
    if text[:1].isdigit() and ("T" in text or "-" in text):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as e:
            raise QueryError(f"bad time {text!r}: use RFC 3339 or a duration") from e
        if moment.tzinfo is None:
            raise QueryError(f"bad time {text!r}: give a timezone (e.g. Z)")
        return int(moment.timestamp() * 1e9)
    seconds = parse_duration(text)
    if not seconds < now:  # before 1970, or too long for a float (400 nines): everything
        return 0
    return int((now - seconds) * 1e9)


def _host_matches(pattern: str, rec: DecisionRecord) -> bool:
    dest = rec.destination
    raw = (rec.decision.host, dest.sni if dest else None, dest.http_host if dest else None)
    # A Host header may carry ":port"; bracketed IPv6 literals never match a name.
    names = {n.lower().rsplit(":", 1)[0].rstrip(".") for n in raw if n}
    if pattern.startswith("*."):
        return any(n.endswith(pattern[1:]) for n in names)
    return pattern in names


@dataclass(frozen=True, slots=True)
class DecisionQuery:
    namespace: str | None = None
    workload: str | None = None
    host: str | None = None
    verdict: Verdict | None = None
    reason: Reason | None = None
    since_unix_ns: int | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def from_params(
        cls, params: Mapping[str, list[str]], max_limit: int | None = MAX_LIMIT
    ) -> DecisionQuery:
        """The filters of a query string; `limit` is cut to `max_limit` (None: uncapped,
        for streams, where it only says when to close)."""

        def one(name: str) -> str | None:
            values = params.get(name)
            return (values[-1].strip() or None) if values else None

        unknown = set(params) - _FILTERS
        if unknown:
            raise QueryError(f"unknown filter(s): {', '.join(sorted(unknown))}")
        verdict = one("verdict")
        reason = one("reason")
        since = one("since")
        limit = one("limit")
        try:
            verdict_v = Verdict(verdict.lower()) if verdict else None
        except ValueError as e:
            raise QueryError(f"bad verdict {verdict!r}: use allow, deny or audit") from e
        try:
            reason_v = Reason(reason.lower()) if reason else None
        except ValueError as e:
            raise QueryError(f"unknown reason {reason!r}") from e
        try:
            limit_v = int(limit) if limit else DEFAULT_LIMIT
        except ValueError as e:
            raise QueryError(f"bad limit {limit!r}") from e
        if limit_v < 1:
            raise QueryError("limit must be at least 1")
        if max_limit is not None:
            limit_v = min(limit_v, max_limit)
        host = one("host")
        return cls(
            namespace=one("namespace"),
            workload=one("workload"),
            host=host.lower().rstrip(".") if host else None,
            verdict=verdict_v,
            reason=reason_v,
            since_unix_ns=parse_since(since) if since else None,
            limit=limit_v,
        )

    def matches(self, rec: DecisionRecord) -> bool:
        d = rec.decision
        if self.verdict is not None and d.verdict is not self.verdict:
            return False
        if self.reason is not None and d.reason is not self.reason:
            return False
        if self.since_unix_ns is not None and rec.start_unix_ns < self.since_unix_ns:
            return False
        workload = rec.identity.workload if rec.identity else None
        if self.namespace is not None:
            ns = d.namespace or (workload.namespace if workload else "")
            if ns != self.namespace:
                return False
        if self.workload is not None:
            if "/" in self.workload:
                if d.workload != self.workload:
                    return False
            elif self.workload not in (d.service_account, workload.name if workload else None):
                return False
        return self.host is None or _host_matches(self.host, rec)
