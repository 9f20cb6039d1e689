"""The page's views of the ring buffer: one decision explained, a namespace's
recent denials grouped with its verdicts over time, and the policy `suggest`
would write for it.

The explanation and the suggested policy come from the functions the CLI's
`explain` and `suggest` print, so the page and the terminal never disagree.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from ..observe.decisionlog import record_detail
from ..observe.query import DecisionQuery

if TYPE_CHECKING:
    from ..observe.recorder import DecisionRecorder
    from ..records import DecisionRecord

# Hostile traffic can name a new host per request: the namespace view lists
# at most this many (workload, destination) groups, the busiest first.
MAX_GROUPS = 200


def explanation(recorder: DecisionRecorder, decision_id: str) -> dict[str, Any] | None:
    """`explain DECISION_ID`, as data and as the text the CLI prints."""
    from ..commands.explain import explanation as explain_doc
    from ..commands.explain import render

    rec = recorder.ring.find(decision_id)
    if rec is None:
        return None
    d = record_detail(rec)
    return {"decision": d, "explanation": explain_doc(d), "text": render(d)}


def _records(recorder: DecisionRecorder, namespace: str, since: str) -> tuple[list[Any], int]:
    query = DecisionQuery.from_params({"namespace": [namespace], "since": [since]})
    assert query.since_unix_ns is not None
    return [r for r in recorder.ring.snapshot() if query.matches(r)], query.since_unix_ns


def suggestion(
    recorder: DecisionRecorder, namespace: str, since: str, wildcards: bool
) -> dict[str, Any]:
    """`suggest --namespace NS --since SINCE`, from this process's buffer."""
    from ..commands.suggest import DEFAULT_NAME, SUGGESTED_VERDICTS, suggest_configmap

    records, _ = _records(recorder, namespace, since)
    found = [
        record_detail(r) for r in reversed(records) if str(r.decision.verdict) in SUGGESTED_VERDICTS
    ]
    command = f"egress-authz suggest --namespace {namespace} --since {since}"
    return {
        "namespace": namespace,
        "since": since,
        "decisions": len(found),
        "command": command + (" --wildcards" if wildcards else ""),
        "policy": (
            suggest_configmap(found, namespace, name=DEFAULT_NAME, wildcards=wildcards)
            if found
            else None
        ),
    }


def _destination(rec: DecisionRecord) -> tuple[str, int | None, str | None]:
    dest = rec.destination
    host = rec.decision.host or (dest and (dest.sni or dest.http_host)) or ""
    return host, dest.port if dest else None, str(dest.protocol) if dest else None


def namespace_summary(
    recorder: DecisionRecorder, namespace: str, since: str, buckets: int
) -> dict[str, Any]:
    """What a namespace was denied or audited, grouped by workload and
    destination, and its decisions per verdict over time."""
    records, since_ns = _records(recorder, namespace, since)
    now_ns = time.time_ns()
    span = max(now_ns - since_ns, 1)
    width = max(1, math.ceil(span / buckets / 1e9))  # whole seconds per bucket
    start_ns = now_ns - width * buckets * 1_000_000_000
    series = [{"verdict": Counter[str]()} for _ in range(buckets)]
    totals: Counter[str] = Counter()
    groups: dict[tuple[str, str, int | None, str | None], dict[str, Any]] = {}
    for rec in records:
        verdict = str(rec.decision.verdict)
        totals[verdict] += 1
        slot = (rec.start_unix_ns - start_ns) // (width * 1_000_000_000)
        if 0 <= slot < buckets:
            series[slot]["verdict"][verdict] += 1
        if verdict == "allow":
            continue
        host, port, protocol = _destination(rec)
        key = (rec.decision.workload, host, port, protocol)
        g = groups.get(key)
        if g is None:
            g = groups[key] = {
                "workload": rec.decision.workload or None,
                "host": host or None,
                "port": port,
                "protocol": protocol,
                "verdicts": Counter[str](),
                "reasons": Counter[str](),
                "last_time_unix_ms": 0,
                "last_decision_id": None,
            }
        g["verdicts"][verdict] += 1
        g["reasons"][str(rec.decision.reason)] += 1
        if rec.start_unix_ns // 1_000_000 >= g["last_time_unix_ms"]:
            g["last_time_unix_ms"] = rec.start_unix_ns // 1_000_000
            g["last_decision_id"] = rec.decision.decision_id
    ordered = sorted(
        groups.values(),
        key=lambda g: (-sum(g["verdicts"].values()), g["workload"] or "", g["host"] or ""),
    )
    return {
        "namespace": namespace,
        "since": since,
        "totals": {v: totals.get(v, 0) for v in ("allow", "deny", "audit")},
        "groups": [
            {**g, "verdicts": dict(g["verdicts"]), "reasons": dict(g["reasons"])}
            for g in ordered[:MAX_GROUPS]
        ],
        "groups_left_out": max(0, len(ordered) - MAX_GROUPS),
        "series": {
            "start_unix_ms": start_ns // 1_000_000,
            "bucket_seconds": width,
            "counts": [
                {v: b["verdict"].get(v, 0) for v in ("allow", "deny", "audit")} for b in series
            ],
        },
    }


def namespaces(recorder: DecisionRecorder) -> list[str]:
    """The source namespaces with a decision in the buffer."""
    return sorted({r.decision.namespace for r in recorder.ring.snapshot() if r.decision.namespace})
