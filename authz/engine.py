"""The decision: compiled PolicySet + Identity + Destination -> Decision.

`compile_policy` runs once per policy change and builds per-namespace
indexes; `decide` runs once per Check and does a handful of dictionary
lookups: exact names in a dict, wildcards by walking the name's parent
suffixes. Its cost does not grow with the number of hosts or namespaces.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import hosts
from .identity import parse_principal as parse_principal  # re-exported: `check`, tests
from .identity import verify
from .model import (
    ALWAYS_ENFORCED,
    Decision,
    Destination,
    Identity,
    Mode,
    NamespacePolicy,
    PolicySet,
    Protocol,
    Reason,
    Rule,
    RuleCheck,
    Tier,
    Verdict,
    Workload,
)

MAX_EXPLAINED = 20  # rules listed in one explanation


# --------------------------------------------------------------------------
# Decision ids: unique across processes and restarts, cheap to make.


class _IdSource:
    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(5).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):06x}"


_IDS = _IdSource()
if hasattr(os, "register_at_fork"):  # a forked worker must not repeat its parent's ids
    os.register_at_fork(after_in_child=_IDS.reseed)


def new_decision_id() -> str:
    return _IDS.next()


# --------------------------------------------------------------------------
# Compiled form


@dataclass(frozen=True, slots=True)
class _Entry:
    rule: Rule
    ref: str  # "namespace/configmap/rule"
    source: str  # "namespace/configmap"
    pattern: str  # the host pattern that put it under this key


@dataclass(slots=True)
class _Scope:
    """One namespace's rules (or the cluster tier's), indexed by host."""

    exact: dict[str, list[_Entry]] = field(default_factory=dict)
    wild: dict[str, list[_Entry]] = field(default_factory=dict)  # "*.X" under "X"
    entries: list[_Entry] = field(default_factory=list)  # one per rule, for explanations
    sources: list[str] = field(default_factory=list)
    modes: set[Mode] = field(default_factory=set)
    mode: Mode = Mode.ENFORCE

    def add(self, policy: NamespacePolicy) -> None:
        source = str(policy.source)
        self.sources.append(source)
        self.modes.add(policy.mode)
        for rule in policy.rules:
            ref = f"{source}/{rule.name}"
            self.entries.append(_Entry(rule, ref, source, ",".join(rule.hosts)))
            for pattern in rule.hosts:
                entry = _Entry(rule, ref, source, pattern)
                if hosts.is_wildcard(pattern):
                    self.wild.setdefault(hosts.wildcard_key(pattern), []).append(entry)
                else:
                    self.exact.setdefault(pattern, []).append(entry)

        # Several ConfigMaps of one namespace add up; enforce wins a conflict
        # so that a second ConfigMap can never switch enforcement off.
        self.mode = Mode.AUDIT if self.modes == {Mode.AUDIT} else Mode.ENFORCE


@dataclass(slots=True)
class Snapshot:
    """A compiled PolicySet: what `decide` reads. Never mutated after compile."""

    revision: int
    trust_domain: str
    policy_set: PolicySet
    namespaces: dict[str, _Scope]
    cluster: _Scope
    deny_exact: dict[str, str]  # host -> "ns/configmap/deny[i]"
    deny_wild: dict[str, str]
    deny_any: str | None
    cluster_mode: Mode  # the mode of namespaces that have no policy of their own


def compile_policy(policy_set: PolicySet, *, trust_domain: str = "cluster.local") -> Snapshot:
    namespaces: dict[str, _Scope] = {}
    cluster = _Scope()
    deny_exact: dict[str, str] = {}
    deny_wild: dict[str, str] = {}
    deny_any: str | None = None
    cluster_modes: set[Mode] = set()
    for policy in policy_set.policies:
        if policy.tier is Tier.CLUSTER:
            cluster.add(policy)
            cluster_modes.add(policy.mode)
            for i, pattern in enumerate(policy.deny):
                ref = f"{policy.source}/deny[{i}]"
                if pattern == "*":
                    deny_any = deny_any or ref
                elif hosts.is_wildcard(pattern):
                    deny_wild.setdefault(hosts.wildcard_key(pattern), ref)
                else:
                    deny_exact.setdefault(pattern, ref)
        else:
            namespaces.setdefault(policy.namespace, _Scope()).add(policy)
    return Snapshot(
        revision=policy_set.revision,
        trust_domain=trust_domain,
        policy_set=policy_set,
        namespaces=namespaces,
        cluster=cluster,
        deny_exact=deny_exact,
        deny_wild=deny_wild,
        deny_any=deny_any,
        cluster_mode=Mode.AUDIT if cluster_modes == {Mode.AUDIT} else Mode.ENFORCE,
    )


# --------------------------------------------------------------------------
# Matching one rule. `_check` returns 0 for a match, else the stage that
# failed; a higher stage means the rule came closer to matching.

_OK, _WORKLOAD, _PROTOCOL, _PORT, _METHOD, _PATH, _EXPIRED = range(7)
_STAGE_REASON = {
    _WORKLOAD: Reason.HOST_NOT_ALLOWED,
    _PROTOCOL: Reason.PROTOCOL_NOT_ALLOWED,
    _PORT: Reason.PORT_NOT_ALLOWED,
    _METHOD: Reason.METHOD_NOT_ALLOWED,
    _PATH: Reason.PATH_NOT_ALLOWED,
    _EXPIRED: Reason.RULE_EXPIRED,
}


def _selects(rule: Rule, service_account: str, workload: Workload | None) -> bool:
    sel = rule.workloads
    if sel.service_accounts is not None and service_account not in sel.service_accounts:
        return False
    if not sel.uses_labels:
        return True
    if workload is None:  # labels unknown: a label selector cannot be satisfied
        return False
    labels = workload.labels
    for key, value in sel.match_labels.items():
        if labels.get(key) != value:
            return False
    for req in sel.match_expressions:
        has = key_present = req.key in labels
        if req.operator == "In":
            has = key_present and labels[req.key] in req.values
        elif req.operator == "NotIn":
            has = not key_present or labels[req.key] not in req.values
        elif req.operator == "DoesNotExist":
            has = not key_present
        if not has:
            return False
    return True


@functools.lru_cache(maxsize=4096)
def clean_path(path: str) -> str | None:
    """The path a prefix is matched against, or None when it cannot be trusted.

    Query and fragment are dropped; encoded dots and slashes or dot segments
    could make '/v1/../admin' pass a '/v1/' prefix, so they are resolved or,
    where ambiguous, make every path rule fail closed.
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return None
    if "%" in path:
        lowered = path.lower()
        if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
            return None
        path = re.sub("%2[eE]", ".", path)
    if "\\" in path:
        return None
    if "/." in path:
        out: list[str] = []
        for seg in path.split("/")[1:]:
            if seg == "..":
                if out:
                    out.pop()
            elif seg != ".":
                out.append(seg)
        tail = "/" if path.endswith(("/.", "/..")) else ""
        path = "/" + "/".join(out) + (tail if out else "")
    return path


def _check(
    rule: Rule,
    service_account: str,
    workload: Workload | None,
    dest: Destination,
    port: int,
    now: float,
) -> int:
    if not _selects(rule, service_account, workload):
        return _WORKLOAD
    if dest.protocol not in rule.protocols:
        return _PROTOCOL
    if port not in rule.ports:
        return _PORT
    http = rule.http
    if http is not None and dest.protocol is Protocol.HTTP:
        if http.methods is not None and (dest.method or "").upper() not in http.methods:
            return _METHOD
        if http.paths is not None or http.exact_paths is not None:
            path = clean_path(dest.path or "")
            if path is None or not (
                (http.exact_paths is not None and path in http.exact_paths)
                or any(path.startswith(prefix) for prefix in http.paths or ())
            ):
                return _PATH
    if rule.expires is not None and now >= rule.expires:
        return _EXPIRED
    return _OK


# --------------------------------------------------------------------------
# Deciding


def reject(
    reason: Reason,
    message: str,
    *,
    revision: int = 0,
    host: str = "",
    namespace: str = "",
    service_account: str = "",
) -> Decision:
    """A denial made before or without policy: bad requests, no policy loaded."""
    return Decision(
        allowed=False,
        verdict=Verdict.DENY,
        reason=reason,
        decision_id=new_decision_id(),
        revision=revision,
        host=host,
        namespace=namespace,
        service_account=service_account,
        message=message,
    )


def _destination_host(dest: Destination) -> tuple[str, int, Reason | None, str]:
    """(host, port, None, "") or ("", port, reason, message)."""
    port = dest.port
    sni_name = host_name = ""
    if dest.sni:
        sni_name, _, reason, message = hosts.normalize_or_reason(dest.sni)
        if reason is not None:
            return "", port, reason, f"SNI: {message}"
    if dest.http_host:
        host_name, host_port, reason, message = hosts.normalize_or_reason(
            dest.http_host, with_port=True
        )
        if reason is not None:
            return "", port, reason, f"Host: {message}"
        # The port judged is the connection's, never the Host header's: else
        # cleartext on port 80 could claim a rule written for 443.
        if host_port is not None and host_port != port:
            return (
                "",
                port,
                Reason.PORT_MISMATCH,
                f"HTTP Host {host_name}:{host_port} names port {host_port}, but the "
                f"connection is to port {port}" + _listener(dest),
            )
    if sni_name and host_name and sni_name != host_name:
        return (
            "",
            port,
            Reason.SNI_HOST_MISMATCH,
            f"TLS SNI {sni_name!r} and HTTP Host {host_name!r} differ (domain fronting)",
        )
    name = sni_name or host_name
    if not name:
        return "", port, Reason.INVALID_HOST, "no destination host: neither SNI nor Host was sent"
    return name, port, None, ""


def _listener(dest: Destination) -> str:
    """How the gateway port map got to the judged port, when it changed it."""
    if dest.listener_port and dest.listener_port != dest.port:
        if not dest.port:
            return (
                f" (the gateway port map knows no Service port for gateway listener "
                f"port {dest.listener_port})"
            )
        return f" (gateway listener port {dest.listener_port})"
    return ""


def _candidates(scope: _Scope | None, host: str) -> Iterable[_Entry]:
    if scope is None:
        return
    exact = scope.exact.get(host)
    if exact:
        yield from exact
    if scope.wild:
        for suffix in hosts.parent_suffixes(host):
            found = scope.wild.get(suffix)
            if found:
                yield from found


def decide(
    snapshot: Snapshot, identity: Identity, destination: Destination, now: float | None = None
) -> Decision:
    """The one decision of one Check. Pure apart from the clock and the id."""
    revision = snapshot.revision
    namespace, account, reason, message = verify(identity, snapshot.trust_domain)
    if reason is not None:
        return reject(
            reason, message, revision=revision, namespace=namespace, service_account=account
        )
    workload = identity.workload
    host, port, reason, message = _destination_host(destination)
    if reason is not None:
        return reject(
            reason, message, revision=revision, namespace=namespace, service_account=account
        )
    denied_by = snapshot.deny_exact.get(host) or snapshot.deny_any
    if denied_by is None and snapshot.deny_wild:
        for suffix in hosts.parent_suffixes(host):
            denied_by = snapshot.deny_wild.get(suffix)
            if denied_by:
                break
    if denied_by is not None:
        d = reject(
            Reason.CLUSTER_DENIED,
            f"{host} is denied for every namespace by {denied_by}",
            revision=revision,
            host=host,
            namespace=namespace,
            service_account=account,
        )
        d._explanation = (RuleCheck(denied_by, False, f"cluster deny lists {host}"),)
        return d

    if now is None:
        now = time.time()
    scope = snapshot.namespaces.get(namespace)
    best, best_entry = -1, None
    for own in (scope, snapshot.cluster):
        if own is None:
            continue
        # Exact names first (one dict lookup), then wildcards by parent suffix.
        found = own.exact.get(host)
        if own.wild:
            for suffix in hosts.parent_suffixes(host):
                more = own.wild.get(suffix)
                if more:
                    found = found + more if found else more
        if not found:
            continue
        for entry in found:
            stage = _check(entry.rule, account, workload, destination, port, now)
            if stage == _OK:
                return Decision(
                    allowed=True,
                    verdict=Verdict.ALLOW,
                    reason=Reason.ALLOWED,
                    decision_id=new_decision_id(),
                    revision=revision,
                    rule=entry.ref,
                    owner=entry.rule.owner,
                    host=host,
                    namespace=namespace,
                    service_account=account,
                    mode=scope.mode if scope is not None else snapshot.cluster_mode,
                    policy_source=entry.source,
                )
            if stage > best:
                best, best_entry = stage, entry
    return _denial(
        snapshot,
        scope,
        namespace,
        account,
        workload,
        destination,
        host,
        port,
        now,
        best,
        best_entry,
    )


def _denial(
    snapshot: Snapshot,
    scope: _Scope | None,
    namespace: str,
    account: str,
    workload: Workload | None,
    dest: Destination,
    host: str,
    port: int,
    now: float,
    best: int,
    best_entry: _Entry | None,
) -> Decision:
    if best_entry is not None:
        reason = _STAGE_REASON[best]
    elif scope is None:
        reason = Reason.NO_POLICY
    else:
        reason = Reason.HOST_NOT_ALLOWED
    mode = scope.mode if scope is not None else snapshot.cluster_mode
    audit = mode is Mode.AUDIT and reason not in ALWAYS_ENFORCED
    sources = scope.sources if scope is not None else []
    return Decision(
        allowed=audit,
        verdict=Verdict.AUDIT if audit else Verdict.DENY,
        reason=reason,
        decision_id=new_decision_id(),
        revision=snapshot.revision,
        rule=best_entry.ref if best_entry is not None else None,
        owner=best_entry.rule.owner if best_entry is not None else None,
        host=host,
        namespace=namespace,
        service_account=account,
        mode=mode,
        message=_message(reason, namespace, account, host, port, dest),
        explainer=functools.partial(
            explain, snapshot, scope, account, workload, dest, host, port, now
        ),
        policy_source=", ".join(sources) if sources else f"{namespace}/<new policy ConfigMap>",
    )


def _message(
    reason: Reason, namespace: str, account: str, host: str, port: int, dest: Destination
) -> str:
    who = f"{namespace}/{account}"
    if reason is Reason.NO_POLICY:
        return f"namespace {namespace} has no egress policy, and no cluster rule allows {host}"
    if reason is Reason.PORT_NOT_ALLOWED:
        return f"{who} may reach {host}, but not on port {port}" + _listener(dest)
    if reason is Reason.PROTOCOL_NOT_ALLOWED:
        return f"{who} may reach {host}, but not over {dest.protocol.value}"
    if reason is Reason.METHOD_NOT_ALLOWED:
        return f"{who} may reach {host}, but not with method {dest.method}"
    if reason is Reason.PATH_NOT_ALLOWED:
        return f"{who} may reach {host}, but not path {dest.path}"
    if reason is Reason.RULE_EXPIRED:
        return f"the rule that allowed {who} to reach {host} has expired"
    return f"no rule allows {who} to reach {host}"


# --------------------------------------------------------------------------
# Explanations: only built for denials and audits, never on the allow path.


def _why(
    rule: Rule,
    account: str,
    workload: Workload | None,
    dest: Destination,
    host: str,
    port: int,
    now: float,
) -> tuple[bool, str]:
    """Whether a rule applies, in words. The verdict comes from `_check`, the
    matcher the allow path uses, so the two can never disagree."""
    if not any(hosts.matches(p, host) for p in rule.hosts):
        return False, f"host {host} is not in hosts [{', '.join(rule.hosts)}]"
    stage = _check(rule, account, workload, dest, port, now)
    if stage == _OK:
        return True, "matches"
    sel = rule.workloads
    if stage == _WORKLOAD:
        if sel.service_accounts is not None and account not in sel.service_accounts:
            return False, (
                f"service account {account} is not in serviceAccounts "
                f"[{', '.join(sorted(sel.service_accounts))}]"
            )
        if workload is None:
            return False, "the rule selects by label, and no Pod is known for the source IP"
        # Written as people write labels (k=v), never as Python reprs.
        has = ", ".join(f"{k}={v}" for k, v in sorted(workload.labels.items())) or "(none)"
        wants = []
        if sel.match_labels:
            wants.append(
                "matchLabels " + ", ".join(f"{k}={v}" for k, v in sorted(sel.match_labels.items()))
            )
        if sel.match_expressions:
            wants.append("matchExpressions " + ", ".join(
                f"{r.key} {r.operator}" + (f" ({', '.join(sorted(r.values))})" if r.values else "")
                for r in sel.match_expressions
            ))
        return False, f"workload labels {has} do not match {' / '.join(wants)}"
    if stage == _PROTOCOL:
        allowed = ", ".join(sorted(p.value for p in rule.protocols))
        return False, f"protocol {dest.protocol.value} is not in protocols [{allowed}]"
    if stage == _PORT:
        return False, f"port {port} is not in ports {sorted(rule.ports)}" + _listener(dest)
    if stage == _EXPIRED:
        return False, f"the rule expired at {rule.expires_text}"
    http = rule.http
    assert http is not None  # the method and path stages exist only with an http match
    if stage == _METHOD:
        return False, f"method {dest.method} is not in methods {sorted(http.methods or ())}"
    path = clean_path(dest.path or "")
    if path is None:
        return False, f"path {dest.path!r} holds encoded slashes or backslashes"
    said = []
    if http.paths:
        said.append(f"starts with none of [{', '.join(http.paths)}]")
    if http.exact_paths:
        said.append(f"is none of exactPaths [{', '.join(sorted(http.exact_paths))}]")
    return False, f"path {path} " + " and ".join(said)


def explain(
    snapshot: Snapshot,
    scope: _Scope | None,
    account: str,
    workload: Workload | None,
    dest: Destination,
    host: str,
    port: int,
    now: float,
) -> tuple[RuleCheck, ...]:
    """The rules nearest to this request, each with why it did or did not apply:
    first those naming the host, then the namespace's (and cluster's) other
    rules for this workload."""
    checks: list[RuleCheck] = []
    seen: set[str] = set()

    def add(entry: _Entry) -> None:
        if entry.ref in seen or len(checks) >= MAX_EXPLAINED:
            return
        seen.add(entry.ref)
        matched, why = _why(entry.rule, account, workload, dest, host, port, now)
        checks.append(RuleCheck(entry.ref, matched, why, entry.rule.owner))

    for own in (scope, snapshot.cluster):
        for entry in _candidates(own, host):
            add(entry)
    for own in (scope, snapshot.cluster):
        if own is None:
            continue
        for entry in own.entries:
            if _selects(entry.rule, account, workload):
                add(entry)
    return tuple(checks)


def rules_matching_host(snapshot: Snapshot, host: str) -> list[tuple[str, str]]:
    """(rule ref, pattern) of every rule, in every namespace, naming `host`.

    For `lint --explain`; walks all namespaces, so never on the Check path.
    """
    found = []
    for scope in [*snapshot.namespaces.values(), snapshot.cluster]:
        for entry in _candidates(scope, host):
            found.append((entry.ref, entry.pattern))
    return found
