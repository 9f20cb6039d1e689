"""The decision log: its schema (LOG_FIELDS), the one renderer of its line
(`log_line`, which the admin API's JSON extends), and writing lines whole.

The log (JSON lines on stdout) is the durable record of every decision; the
ring buffer, the admin API and the spans read the same names
(docs/tracing.md, "Decision log").
"""

from __future__ import annotations

import json
import json.encoder
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..model import Mode, Reason, Verdict
from ..model import Protocol as NetProtocol
from ..records import DecisionRecord
from .bounded import bound_explanation, cut

# The decision log's fields, in output order: a public contract (docs/tracing.md,
# "Decision log"). Every line carries every key; absent values are null.
LOG_FIELDS = (
    "time",
    "decision_id",
    "verdict",
    "reason",
    "rule",
    "owner",
    "namespace",
    "service_account",
    "pod",
    "source_ip",
    "principal",
    "host",
    "port",
    "sni",
    "http_host",
    "method",
    "path",
    "protocol",
    "filter",
    "mode",
    "revision",
    "policy_source",
    "latency_us",
    "trace_id",
)


# ---------------------------------------------------------------------------
# Records as plain values: the decision log, the admin API and span attributes
# all read these, so the three always agree on names.


_second_text: tuple[int, str] = (-1, "")


def _rfc3339(unix_ns: int) -> str:
    """UTC with milliseconds; the text of the second is reused (one per line adds up)."""
    global _second_text
    second, ms = divmod(unix_ns // 1_000_000, 1000)
    cached_second, text = _second_text
    if second != cached_second:
        text = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _second_text = (second, text)
    return f"{text}{ms:03d}Z"


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent header, or None when it is not one."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1].lower()


def _sampled(traceparent: str | None) -> bool:
    """Whether a W3C traceparent carries the sampled flag (version 00 layout)."""
    if not traceparent or len(traceparent) < 55 or trace_id_of(traceparent) is None:
        return False
    try:
        return bool(int(traceparent[53:55], 16) & 1)
    except ValueError:
        return False


def record_fields(rec: DecisionRecord, trace_id: str | None = None) -> dict[str, Any]:
    """The flat decision-log view of one record (keys: LOG_FIELDS)."""
    d = rec.decision
    ident = rec.identity
    dest = rec.destination
    workload = ident.workload if ident is not None else None
    return {
        "time": _rfc3339(rec.start_unix_ns),
        "decision_id": d.decision_id,
        "verdict": str(d.verdict),
        "reason": str(d.reason),
        "rule": d.rule,
        "owner": d.owner,
        "namespace": d.namespace or (workload.namespace if workload else None) or None,
        "service_account": d.service_account
        or (workload.service_account if workload else None)
        or None,
        "pod": (workload.name or None) if workload else None,
        "source_ip": (ident.source_ip or None) if ident else None,
        "principal": (ident.principal or None) if ident else None,
        "host": d.host or None,
        "port": dest.port if dest else None,
        "sni": dest.sni if dest else None,
        "http_host": dest.http_host if dest else None,
        "method": dest.method if dest else None,
        "path": dest.path if dest else None,
        "protocol": str(dest.protocol) if dest else None,
        "filter": rec.filter or None,
        "mode": str(d.mode),
        "revision": d.revision,
        "policy_source": d.policy_source,
        "latency_us": round(rec.duration_ns / 1000, 1),
        "trace_id": trace_id or trace_id_of(rec.traceparent),
    }


# The C string encoder json.dumps(..., ensure_ascii=False) uses: quotes and
# escapes '"', '\\' and control characters, keeps the rest as is.
_json_str: Callable[[str], str] = json.encoder.encode_basestring


class _JsonStrings(dict[str | None, str]):
    """JSON string literals of recent short values, by value.

    A log line has ~16 text fields and nearly all of them (namespace, pod,
    principal, host, rule, ...) repeat from Check to Check: a dict hit is a C
    call, where a Python helper per field cost ~0.5 µs each. Bounded: values
    over _MEMO_CHARS are encoded and not kept, and the memo starts afresh at
    _MEMO_SIZE entries, so hostile variety costs a re-encode, never memory.
    """

    def __missing__(self, value: str | None) -> str:
        if value is None:
            return "null"
        text = _json_str(value)
        if len(value) <= _MEMO_CHARS:
            if len(self) >= _MEMO_SIZE:
                self.clear()
            self[value] = text
        return text


_MEMO_CHARS = 256
_MEMO_SIZE = 4096
_jstr: Callable[[str | None], str] = _JsonStrings().__getitem__
_jstr_memo = _jstr


def _jpath(value: str | None) -> str:
    """Paths vary per request (ids, queries): encoded each time, not memoised."""
    return "null" if value is None else _json_str(value)


_jpath_full = _jpath


# The JSON of every enum value a line carries (verdict, reason, mode, protocol).
_ENUM_JSON: dict[object, str] = {
    member: _json_str(str(member))
    for enum_type in (Verdict, Reason, Mode, NetProtocol)
    for member in enum_type
}


def _tight_str(value: str | None) -> str:
    return "null" if value is None else _json_str(cut(value, TIGHT))


def log_line(rec: DecisionRecord, trace_id: str | None, *, tight: bool = False) -> str:
    """The decision-log line of one record, without the newline: the one
    renderer of the line (the admin API's JSON extends it, `fit_line` calls
    it again with `tight`).

    The same text as `json.dumps(record_fields(rec, trace_id), separators=(",", ":"),
    ensure_ascii=False)` (a test holds the two together), in a third of the
    time: it runs on the Check path (orjson on `record_fields` measured no
    faster: 3.0 µs against 2.8). `trace_id` is the one the line names:
    the caller's (`trace_id_of(rec.traceparent)`) or a new one for a span.
    `tight` cuts every text field but the decision id (what joins the line
    to spans and access logs) to TIGHT characters.
    """
    d = rec.decision
    ident = rec.identity
    dest = rec.destination
    e = _ENUM_JSON
    _jstr = _tight_str if tight else _jstr_memo
    _jpath = _tight_str if tight else _jpath_full
    workload = ident.workload if ident is not None else None
    if workload is not None:
        namespace = d.namespace or workload.namespace or None
        service_account = d.service_account or workload.service_account or None
        pod = workload.name or None
    else:
        namespace = d.namespace or None
        service_account = d.service_account or None
        pod = None
    if ident is not None:
        source_ip, principal = _jstr(ident.source_ip or None), _jstr(ident.principal or None)
        who = f'"source_ip":{source_ip},"principal":{principal}'
    else:
        who = '"source_ip":null,"principal":null'
    if dest is not None:
        port = "null" if dest.port is None else int.__repr__(dest.port)
        where = (
            f'"port":{port},"sni":{_jstr(dest.sni)},"http_host":{_jstr(dest.http_host)},'
            f'"method":{_jstr(dest.method)},"path":{_jpath(dest.path)},'
            f'"protocol":{e[dest.protocol]}'
        )
    else:
        where = '"port":null,"sni":null,"http_host":null,"method":null,"path":null,"protocol":null'
    revision = "null" if d.revision is None else int.__repr__(d.revision)
    return (
        f'{{"time":"{_rfc3339(rec.start_unix_ns)}","decision_id":{_json_str(d.decision_id)},'
        f'"verdict":{e[d.verdict]},"reason":{e[d.reason]},'
        f'"rule":{_jstr(d.rule)},"owner":{_jstr(d.owner)},'
        f'"namespace":{_jstr(namespace)},"service_account":{_jstr(service_account)},'
        f'"pod":{_jstr(pod)},{who},"host":{_jstr(d.host or None)},{where},'
        f'"filter":{_jstr(rec.filter or None)},"mode":{e[d.mode]},'
        f'"revision":{revision},"policy_source":{_jstr(d.policy_source)},'
        f'"latency_us":{float.__repr__(round(rec.duration_ns / 1000, 1))},'
        f'"trace_id":{_jstr(trace_id)}}}'
    )


def record_detail(rec: DecisionRecord) -> dict[str, Any]:
    """The admin API's view: the log fields plus what `explain` needs."""
    out = record_fields(rec)
    workload = rec.identity.workload if rec.identity else None
    out["workload"] = rec.decision.workload or None
    out["labels"] = dict(workload.labels) if workload else {}
    out["message"] = rec.decision.message
    out["allowed"] = rec.decision.allowed
    out["explanation"] = [
        {"rule": c.rule, "matched": c.matched, "why": c.why, "owner": c.owner}
        for c in bound_explanation(rec.decision.explanation)
    ]
    return out


_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def detail_json(rec: DecisionRecord) -> str:
    """`record_detail(rec)` as compact JSON (ensure_ascii off), built on `log_line`:
    the admin endpoint sends thousands of these, and this costs a third of
    `json.dumps(record_detail(rec))` (a test holds the two together)."""
    d = rec.decision
    workload = rec.identity.workload if rec.identity else None
    labels = _COMPACT.encode(dict(workload.labels)) if workload and workload.labels else "{}"
    checks = bound_explanation(d.explanation)
    explanation = ",".join(
        f'{{"rule":{_jstr(c.rule)},"matched":{"true" if c.matched else "false"},'
        f'"why":{_jstr(c.why)},"owner":{_jstr(c.owner)}}}'
        for c in checks
    )
    return (
        f"{log_line(rec, trace_id_of(rec.traceparent))[:-1]},"
        f'"workload":{_jstr(d.workload or None)},"labels":{labels},'
        f'"message":{_jstr(d.message)},"allowed":{"true" if d.allowed else "false"},'
        f'"explanation":[{explanation}]}}'
    )


# The decision log's longest line, in bytes: PIPE_BUF, so that every line is one
# atomic write(2) even when `--workers` processes share stdout. The field caps
# (authz.observe.bounded) keep ordinary lines far below it; a line of escaped control
# characters or long policy names that still exceeds it is rendered again with
# every text field cut to TIGHT characters (24 x 6 bytes per escaped character
# x 20 text fields + keys < 4096).
LOG_LINE_MAX = 4096
TIGHT = 24


def fit_line(line: str, rec: DecisionRecord, trace_id: str | None) -> str:
    """`line` if it is within LOG_LINE_MAX bytes, else the same record with every
    text field cut to TIGHT characters."""
    # A character is at most 4 bytes of UTF-8: short lines need no encoding.
    if len(line) * 4 <= LOG_LINE_MAX or len(line.encode("utf-8", "replace")) <= LOG_LINE_MAX:
        return line
    return log_line(rec, trace_id, tight=True)


PIPE_BUF = 4096


def write_whole_lines(fd: int, data: bytes) -> None:
    """Write newline-terminated `data` to `fd` in chunks of whole lines of at
    most PIPE_BUF bytes.

    Under `serve --workers N` every worker writes its decision log to the same
    stdout pipe; the kernel keeps writes of up to PIPE_BUF bytes whole, so no
    worker's line is ever cut by another's. (A single line longer than that,
    a rare huge path, is written alone and may be interleaved.)
    """
    view = memoryview(data)
    start, size = 0, len(data)
    while start < size:
        end = start + PIPE_BUF
        if end >= size:
            end = size
        else:
            cut = data.rfind(b"\n", start, end)
            # No newline within PIPE_BUF: one long line, written alone.
            end = cut + 1 if cut >= 0 else data.index(b"\n", end) + 1
        write_all(fd, view[start:end])
        start = end


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
