"""The verdict table: one row per call, the expectation checked on each.

Columns are part of the demo's contract with tests/test_demo.py and the
README: CASE, WHO, WHERE, VIA, CLIENT SAW, VERDICT, REASON, and CHECK,
which is `ok` or says what was expected instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from .calls import Outcome

COLUMNS = ("#", "CASE", "WHO", "WHERE", "VIA", "CLIENT SAW", "VERDICT", "REASON", "CHECK")


def rows(outcomes: Sequence[Outcome]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for n, o in enumerate(outcomes, 1):
        c = o.call
        if o.as_expected:
            check = "ok"
        elif o.leaked:
            check = "REACHED THE HOST"
        else:
            check = f"EXPECTED {c.expect_verdict} {c.expect_reason}"
        number = f"{n}*" if c.note else str(n)
        out.append(
            (number, c.case, c.pod.workload, c.host, c.via.value, o.saw, o.verdict, o.reason,
             check)
        )
    return out


def render(outcomes: Sequence[Outcome]) -> str:
    body = rows(outcomes)
    widths = [max(len(r[i]) for r in [COLUMNS, *body]) for i in range(len(COLUMNS))]
    lines = []
    for r in [COLUMNS, *body]:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    notes = [f"{n}* {o.call.note}" for n, o in enumerate(outcomes, 1) if o.call.note]
    return "\n".join(lines + (["", *notes] if notes else []))


def legend() -> str:
    return (
        "VIA: TLS = the app's own TLS through its sidecar (network ext_authz); HTTP = plain\n"
        "HTTP through its sidecar (HTTP ext_authz); HTTP* = the pod's own mTLS straight\n"
        "to the gateway's HTTP listener, without its sidecar, as a compromised pod could."
    )
