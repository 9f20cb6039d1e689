"""`egress-authz explain DECISION_ID`: why one recorded decision went as it did.

The id comes from a denied response body, a decision-log line or `traces`;
the answer comes from the server's ring buffer (`/v1/decisions/{id}`), which
holds the rules the engine considered and why each did or did not apply.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from ._common import add_output
from .exits import UsageError
from .traces import EXIT_ERROR, EXIT_OK, add_server_argument, latency_of

# engine.new_decision_id: 10 hex digits of process prefix, then a hex counter.
DECISION_ID = re.compile(r"[0-9a-f]{16,32}\Z")

# What to tell people for the denials no namespace policy can lift.
_NOT_A_POLICY_MATTER = {
    "cluster-denied": "The cluster policy denies this host to every namespace; a namespace "
    "policy cannot lift that. Ask the owners of {source} (the platform team).",
    "invalid-host": "The request named no valid DNS host, so no policy can allow it. "
    "Fix the client's URL or Host header.",
    "ip-literal": "The request went to an IP address, not a name. Policies allow names only: "
    "call the service by its DNS name.",
    "sni-host-mismatch": "The TLS SNI and the HTTP Host name different hosts (domain "
    "fronting), which is denied in every mode. Make the client send the same name in both.",
    "port-mismatch": "The HTTP Host header names a port other than the one the connection "
    "was made to (after the gateway port map), which is denied in every mode. Make the "
    "client send Host without a port, or with the port it dialled.",
    "untrusted-identity": "The caller's certificate is not a SPIFFE identity of this mesh's "
    "trust domain. Is the Pod in the mesh (sidecar injected, mTLS to the egress gateway)?",
    "identity-mismatch": "The source IP belongs to a different Pod than the certificate "
    "names. This happens briefly when a Pod IP is reused; if it persists, investigate.",
    "bad-request": "Envoy sent a Check this service could not read. Check the gateway's "
    "ext_authz configuration (see the README).",
    "unknown-workload": "No Pod is known at the source address, so the certificate "
    "is not honoured there: it may be used outside its Pod. If the Pod is new, retry; if the "
    "gateway does not see Pod IPs (SNAT, multi-cluster), see `--unknown-workloads` in "
    "docs/security.md.",
    "path-not-normalized": "The HTTP path is ambiguous (escaped '/' or '\\', a double escape, "
    "invalid UTF-8, an escaped or ';' dot segment such as '..;'): upstreams could read it as "
    "different paths, so no path rule allows it, in any mode. Make the client send a plain "
    "path (see docs/security.md).",
}


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain",
        help="explain one recorded decision: why it was allowed or denied",
        description="Show the identity and destination as the gateway saw them, each "
        "candidate rule and why it did or did not apply, and the ConfigMap to edit.",
    )
    p.add_argument("decision_id", metavar="DECISION_ID")
    add_server_argument(p)
    add_output(p, "text", "json")
    from .replicas import add_kube_arguments

    add_kube_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from .admin_client import AdminError
    from .replicas import client_for

    out = out or sys.stdout
    if not DECISION_ID.match(args.decision_id.strip().lower()):
        raise UsageError(
            f"{args.decision_id[:80]!r} is not a decision id: ids are 16 or more hex digits, "
            "as in a 403 body's decision_id or `egress-authz traces -o json`"
        )
    client = None
    try:
        client = client_for(args, "egress-authz explain")
        d = client.decision(args.decision_id.strip().lower())
    except AdminError as e:  # AdminNotFound says the id is not in the buffer
        print(f"egress-authz explain: {e}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        close = getattr(client, "close", None)
        if callable(close):
            close()
    if getattr(args, "output", "text") == "json":
        import json

        out.write(json.dumps(d, indent=2) + "\n")
    else:
        out.write(render(d))
    return EXIT_OK


def _configmap_command(source: str) -> str | None:
    namespace, _, name = source.partition("/")
    if not name or "<" in name:
        return None
    return f"kubectl -n {namespace} edit configmap {name}"


def _value(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def explanation(d: Mapping[str, Any]) -> dict[str, Any]:
    """What `explain` says about one decision, as data: the one source of truth
    for the text below and for the admin endpoint's page (`/v1/explanations/{id}`).

    `fix` is a list of {kind, text}: `text` a sentence, `command` a shell
    command, `code` a YAML snippet.
    """
    from .suggest import rule_snippet

    verdict = str(d.get("verdict", "?"))
    reason = str(d.get("reason", "?"))
    labels = d.get("labels") or {}
    pod, src = d.get("pod"), d.get("source_ip")
    identity = [
        ("principal", d.get("principal")),
        ("namespace", d.get("namespace")),
        ("service account", d.get("service_account")),
        ("pod", f"{pod} ({src})" if pod else (f"none known for {src}" if src else None)),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))),
    ]
    destination: list[tuple[str, Any]] = []
    if d.get("host"):
        destination.append(("host", d["host"]))
    else:
        # Denied before the host was judged (identity, bad request): still say
        # what was asked for, as `traces` does, and that it was not evaluated.
        asked = d.get("sni") or d.get("http_host")
        destination.append(("host", f"{asked} (not evaluated)" if asked else None))
    protocol = d.get("protocol")
    if protocol and d.get("filter"):
        protocol = f"{protocol} ({d['filter']} filter)"
    destination += [
        ("port", d.get("port")),
        ("protocol", protocol),
        ("sni", d.get("sni")),
        ("http host", d.get("http_host")),
    ]
    if d.get("method") or d.get("path"):
        destination.append(("request", f"{d.get('method') or '?'} {d.get('path') or ''}"))

    checks = d.get("explanation") or []
    fix: list[dict[str, str]] = []
    if verdict != "allow":
        source = str(d.get("policy_source") or "")
        rule = str(d.get("rule") or "")
        if reason in _NOT_A_POLICY_MATTER:
            if not source and checks:
                # A cluster deny names its ConfigMap in the check: "ns/configmap/deny[0]".
                source = "/".join(str(checks[0].get("rule", "")).split("/")[:2])
            fix.append(
                {"kind": "text", "text": _NOT_A_POLICY_MATTER[reason].format(source=source or "it")}
            )
        else:
            # The rule that came closest names its ConfigMap ("ns/configmap/rule").
            target = "/".join(rule.split("/")[:2]) if rule.count("/") >= 2 else source
            command = _configmap_command(target)
            if command:
                text = f"The policy to edit is the ConfigMap {target}:"
                fix.append({"kind": "text", "text": text})
                fix.append({"kind": "command", "text": command})
            else:
                ns = d.get("namespace") or "NAMESPACE"
                fix.append(
                    {
                        "kind": "text",
                        "text": f"Namespace {ns} has no policy ConfigMap yet. Create one labelled "
                        f'egress-authz.io/policy: "true" (a start: egress-authz suggest '
                        f"--namespace {ns}).",
                    }
                )
            snippet = rule_snippet(d)
            if snippet:
                fix.append({"kind": "text", "text": snippet[0]})
            if len(snippet) > 1:
                fix.append({"kind": "code", "text": "\n".join(snippet[1:])})
        if verdict == "audit":
            fix.append(
                {
                    "kind": "text",
                    "text": "(Audit mode: this request was let through; it will be denied once "
                    "the namespace switches to mode: enforce.)",
                }
            )
    return {
        "decision_id": d.get("decision_id"),
        "verdict": verdict,
        "reason": reason,
        "time": d.get("time"),
        "revision": d.get("revision"),
        "mode": d.get("mode"),
        "latency": latency_of(d),
        "message": d.get("message") or None,
        "identity": [{"label": k, "value": _value(v)} for k, v in identity],
        "destination": [{"label": k, "value": _value(v)} for k, v in destination],
        "rules": [
            {
                "rule": c.get("rule"),
                "matched": bool(c.get("matched")),
                "why": c.get("why"),
                "owner": c.get("owner") or None,
            }
            for c in checks
        ],
        "allowed_by": (
            {"rule": d.get("rule"), "owner": d.get("owner") or None}
            if verdict == "allow" and not checks
            else None
        ),
        "fix": fix,
    }


def _field(label: str, value: str | None) -> str:
    return f"  {label:<16} {value if value is not None else '-'}\n"


def render(d: Mapping[str, Any]) -> str:
    """The text `explain` prints: `explanation(d)`, laid out for a terminal."""
    e = explanation(d)
    out = [f"Decision {e['decision_id']}\n"]
    if d.get("replica"):  # --kube: the replica that recorded it
        out.append(f"  recorded by replica {d['replica']}\n")
    out.append(
        f"  {e['verdict'].upper()} ({e['reason']}) at {e['time']}, policy revision "
        f"{e['revision']}, mode {e['mode']}, answered in {e['latency']}\n"
    )
    if e["message"]:
        out.append(f"  {e['message']}\n")
    out.append("\nIdentity, as seen at the gateway\n")
    out.extend(_field(f["label"], f["value"]) for f in e["identity"])
    out.append("\nDestination, as seen\n")
    out.extend(_field(f["label"], f["value"]) for f in e["destination"])
    if e["rules"]:
        out.append("\nRules considered\n")
        for c in e["rules"]:
            mark = "applies" if c["matched"] else "no     "
            owner = f"  [owner: {c['owner']}]" if c["owner"] else ""
            out.append(f"  {mark}  {c['rule']}: {c['why']}{owner}\n")
    elif e["allowed_by"]:
        by = e["allowed_by"]
        owner = f" (owner: {by['owner']})" if by["owner"] else ""
        out.append(f"\nAllowed by rule {by['rule']}{owner}.\n")
    if e["verdict"] != "allow":
        out.append("\nWhat to change\n")
        for item in e["fix"]:
            indent = "      " if item["kind"] == "command" else "  "
            out.extend(f"{indent}{line}\n" for line in item["text"].split("\n"))
    return "".join(out)
