"""Policy ConfigMap -> NamespacePolicy, or errors that say where and why.

The first stage on the policy side of the data flow: every source (files on
disk, a Kubernetes watch) hands ConfigMap dicts here and gets back a
validated, canonical NamespacePolicy. Nothing unknown is silently ignored.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import hosts
from .echo import shown
from .model import (
    POLICY_DATA_KEY,
    POLICY_LABEL,
    TIER_CLUSTER,
    TIER_LABEL,
    ConfigMapRef,
    HttpMatch,
    LabelRequirement,
    Mode,
    NamespacePolicy,
    Protocol,
    Rule,
    Tier,
    WorkloadSelector,
)
from .paths import normalize_path
from .yamlload import POLICY_LIMITS, YamlError, load_one

TOP_FIELDS = ("mode", "rules")
# The cluster admin's explicit opt-in to wildcards over a public suffix in the
# cluster tier's own allow rules (see hosts.public_suffix_problem).
PUBLIC_SUFFIX_OPT_IN = "allowPublicSuffixWildcards"
# ... and to cluster-internal or special-use hosts (see hosts.internal_problem).
INTERNAL_HOSTS_OPT_IN = "allowInternalHosts"
OPT_INS = (PUBLIC_SUFFIX_OPT_IN, INTERNAL_HOSTS_OPT_IN)
CLUSTER_TOP_FIELDS = ("mode", "rules", "deny", *OPT_INS)
RULE_FIELDS = ("name", "workloads", "hosts", "ports", "protocols", "http", "expires", "owner")
WORKLOAD_FIELDS = ("serviceAccounts", "matchLabels", "matchExpressions")
EXPRESSION_FIELDS = ("key", "operator", "values")
HTTP_FIELDS = ("methods", "paths", "exactPaths")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
DEFAULT_PORTS = frozenset({443})
# Bounds on one ConfigMap, beside the YAML limits (authz.yamlload.POLICY_LIMITS):
# far above real policies, low enough that one namespace cannot make compiling
# or explaining everyone's decisions slow.
MAX_RULES = 5000
MAX_HOSTS = 5000

_NAME_PART = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_METHOD = re.compile(r"[A-Z]{1,20}\Z")
_RULE_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")


class PolicyError(ValueError):
    """A ConfigMap that cannot be accepted; `problems` are one line each."""

    def __init__(
        self, source: str, problems: list[str], yaml_mark: tuple[int, int, str] | None = None
    ) -> None:
        super().__init__("\n".join(problems))
        self.source = source
        self.problems = problems
        # For bad YAML: (line, column, problem), 0-based within policy.yaml, so
        # that a file source can point at the line of the file instead.
        self.yaml_mark = yaml_mark


@dataclass
class _Problems:
    """Collects every problem of one ConfigMap, each prefixed with its location."""

    prefix: str
    items: list[str] = field(default_factory=list)

    def add(self, where: str, message: str) -> None:
        where = f" {where}" if where else ""
        self.items.append(f"{self.prefix}{where}: {message}")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        dict: "a map",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }.get(type(value), type(value).__name__)


def _unknown(p: _Problems, where: str, obj: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in obj:
        if key not in allowed:
            p.add(where, f"unknown field {shown(key)}; allowed: {', '.join(allowed)}")


def label_key_problem(key: Any) -> str | None:
    """Why `key` is not a valid Kubernetes label key, or None."""
    if not isinstance(key, str) or not key:
        return "label key must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key prefix {shown(prefix)} must be a DNS subdomain (lower-case, '.', '-')"
    if len(name) > 63 or not _NAME_PART.match(name):
        return (
            f"label key name {shown(name)} must be 1-63 characters of letters, digits, "
            "'-', '_', '.', starting and ending with a letter or digit"
        )
    return None


def label_value_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"label value must be a string, not {_type_name(value)} (quote it in YAML)"
    if value and (len(value) > 63 or not _NAME_PART.match(value)):
        return (
            f"label value {shown(value)} must be at most 63 characters of letters, digits, "
            "'-', '_', '.', starting and ending with a letter or digit"
        )
    return None


def _string_list(p: _Problems, where: str, value: Any) -> list[str] | None:
    if not isinstance(value, list):
        p.add(where, f"must be a list, not {_type_name(value)}")
        return None
    bad = [i for i, item in enumerate(value) if not isinstance(item, str)]
    for i in bad:
        p.add(f"{where}[{i}]", f"must be a string, not {_type_name(value[i])}")
    # With a non-string dropped, later items' indexes would name the wrong item:
    # the list is reported as it stands and not checked further.
    return None if bad else list(value)


def _parse_workloads(p: _Problems, where: str, raw: Any) -> WorkloadSelector:
    if raw is None:
        return WorkloadSelector()
    if not isinstance(raw, dict):
        p.add(where, f"must be a map, not {_type_name(raw)}")
        return WorkloadSelector()
    _unknown(p, where, raw, WORKLOAD_FIELDS)
    accounts: frozenset[str] | None = None
    if "serviceAccounts" in raw:
        names = _string_list(p, f"{where}.serviceAccounts", raw["serviceAccounts"])
        if names is not None:
            if not names:
                p.add(f"{where}.serviceAccounts", "is empty; omit it to select every account")
            for i, name in enumerate(names):
                if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
                    p.add(
                        f"{where}.serviceAccounts[{i}]",
                        f"{shown(name)} is not a valid service account name",
                    )
            accounts = frozenset(names)
    labels: dict[str, str] = {}
    if "matchLabels" in raw:
        ml = raw["matchLabels"]
        if not isinstance(ml, dict):
            p.add(f"{where}.matchLabels", f"must be a map, not {_type_name(ml)}")
        else:
            for k, v in ml.items():
                problem = label_key_problem(k) or label_value_problem(v)
                if problem:
                    p.add(f"{where}.matchLabels[{shown(k)}]", problem)
                else:
                    labels[k] = v
    expressions: list[LabelRequirement] = []
    if "matchExpressions" in raw:
        exprs = raw["matchExpressions"]
        if not isinstance(exprs, list):
            p.add(f"{where}.matchExpressions", f"must be a list, not {_type_name(exprs)}")
            exprs = []
        for i, expr in enumerate(exprs):
            loc = f"{where}.matchExpressions[{i}]"
            req = _parse_expression(p, loc, expr)
            if req is not None:
                expressions.append(req)
    return WorkloadSelector(accounts, MappingProxyType(labels), tuple(expressions))


def _parse_expression(p: _Problems, loc: str, expr: Any) -> LabelRequirement | None:
    if not isinstance(expr, dict):
        p.add(loc, f"must be a map with key, operator, values, not {_type_name(expr)}")
        return None
    _unknown(p, loc, expr, EXPRESSION_FIELDS)
    key, op, values = expr.get("key"), expr.get("operator"), expr.get("values")
    ok = True
    if (problem := label_key_problem(key)) is not None:
        p.add(f"{loc}.key", problem)
        ok = False
    if op not in OPERATORS:
        p.add(f"{loc}.operator", f"{shown(op)} is not an operator; allowed: {', '.join(OPERATORS)}")
        return None
    parsed: list[str] = []
    if op in ("In", "NotIn"):
        got = _string_list(p, f"{loc}.values", values if values is not None else [])
        if got is not None and not got:
            p.add(f"{loc}.values", f"operator {op} needs at least one value")
            ok = False
        for j, v in enumerate(got or []):
            if (problem := label_value_problem(v)) is not None:
                p.add(f"{loc}.values[{j}]", problem)
                ok = False
        parsed = got or []
    elif values:
        p.add(f"{loc}.values", f"operator {op} takes no values")
        ok = False
    return LabelRequirement(str(key), op, frozenset(parsed)) if ok else None


def _parse_ports(p: _Problems, where: str, raw: Any) -> frozenset[int]:
    if raw is None:
        return DEFAULT_PORTS
    if not isinstance(raw, list) or not raw:
        p.add(where, "must be a non-empty list of port numbers 1-65535")
        return DEFAULT_PORTS
    ports = set()
    for i, port in enumerate(raw):
        if isinstance(port, bool) or not isinstance(port, int):
            p.add(f"{where}[{i}]", f"{shown(port)} is not a port number; use 1-65535")
        elif not 0 < port <= 65535:
            p.add(f"{where}[{i}]", f"{port} is out of range; use 1-65535")
        else:
            ports.add(port)
    return frozenset(ports)


def _parse_protocols(p: _Problems, where: str, raw: Any) -> frozenset[Protocol]:
    allowed = frozenset(Protocol)
    if raw is None:
        return allowed
    names = _string_list(p, where, raw)
    if names is None:
        return allowed
    if not names:
        p.add(where, "is empty; omit it to allow both TLS and HTTP")
    out = set()
    for i, name in enumerate(names):
        try:
            out.add(Protocol(name.upper()))
        except ValueError:
            p.add(f"{where}[{i}]", f"{shown(name)} is not a protocol; allowed: TLS, HTTP")
    return frozenset(out)


def _parse_http(p: _Problems, where: str, raw: Any) -> HttpMatch | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        p.add(where, f"must be a map with methods and/or paths, not {_type_name(raw)}")
        return None
    _unknown(p, where, raw, HTTP_FIELDS)
    methods = None
    if "methods" in raw:
        got = _string_list(p, f"{where}.methods", raw["methods"])
        if got is not None:
            methods = frozenset(m.upper() for m in got)
            for i, m in enumerate(got):
                if not _METHOD.match(m.upper()):
                    p.add(f"{where}.methods[{i}]", f"{shown(m)} is not an HTTP method such as GET")
            if not got:
                p.add(f"{where}.methods", "is empty; omit it to allow every method")
    paths = exact = None
    if "paths" in raw:
        got = _path_list(p, f"{where}.paths", raw["paths"], "a path prefix",
                         "is empty; omit it to allow every path")
        paths = None if got is None else tuple(got)
    if "exactPaths" in raw:
        got = _path_list(p, f"{where}.exactPaths", raw["exactPaths"], "an exact path",
                         "is empty; omit it")
        exact = None if got is None else frozenset(got)
    return HttpMatch(methods, paths, exact)


def _path_list(p: _Problems, where: str, raw: Any, what: str, if_empty: str) -> list[str] | None:
    """`paths` or `exactPaths`: a list of strings, each a path in normal form, not empty."""
    got = _string_list(p, where, raw)
    if got is not None:
        for i, path in enumerate(got):
            _path_problem(p, f"{where}[{i}]", path, what)
        if not got:
            p.add(where, if_empty)
    return got


def _path_problem(p: _Problems, where: str, path: str, what: str) -> None:
    # The engine normalizes a request's path before comparing, so a pattern
    # that is not normal itself could never match as written.
    if not path.startswith("/"):
        p.add(where, f"{shown(path)} must start with '/' ({what})")
    elif (normal := normalize_path(path)) != path:
        fix = f"; write {shown(normal)}" if normal else ""
        p.add(
            where,
            f"{shown(path)}: {what} holds no query, fragment, escapes or dot segments "
            f"and no '//' (it is matched against normalized paths){fix}",
        )


def _parse_expires(p: _Problems, where: str, raw: Any) -> float | None:
    if raw is None:
        return None
    when: dt.datetime
    if isinstance(raw, dt.datetime):
        when = raw
    elif isinstance(raw, dt.date):
        when = dt.datetime(raw.year, raw.month, raw.day, tzinfo=dt.UTC)
    elif isinstance(raw, str):
        text = raw.strip()
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            p.add(where, f"{shown(raw)} is not a date; use RFC 3339 such as 2027-01-31T00:00:00Z")
            return None
        if len(text) == 10:  # a bare date means the start of that day, UTC
            when = when.replace(tzinfo=dt.UTC)
    else:
        p.add(where, f"must be an RFC 3339 time string, not {_type_name(raw)}")
        return None
    if when.tzinfo is None:
        p.add(where, f"{shown(raw, quote=False)} has no time zone; "
              "add 'Z' or an offset such as +02:00")
        return None
    return when.timestamp()


def _host_problem(host: Any, e: hosts.PatternError) -> str:
    return f'"{shown(host, quote=False)}": {e}' if isinstance(host, str) else str(e)


def _parse_rule(p: _Problems, index: int, raw: Any, *, tier: Tier, wide_ok: bool,
                internal_ok: bool, cluster_domain: str) -> Rule | None:
    where = f"rules[{index}]"
    if not isinstance(raw, dict):
        p.add(where, f"must be a map, not {_type_name(raw)}")
        return None
    name = raw.get("name")
    if name is None:
        p.add(f"{where}.name", "every rule needs a name: 1-63 letters, digits, '-', '_', '.'")
        name = f"#{index}"
    elif not isinstance(name, str) or not _RULE_NAME.match(name):
        p.add(
            f"{where}.name",
            f"invalid name {str(name)[:80]!r}: use 1-63 letters, digits, '-', '_', '.', "
            "starting and ending with a letter or digit",
        )
        name = f"#{index}"
    where = f'{where} "{name}"'
    before = len(p.items)
    _unknown(p, where, raw, RULE_FIELDS)
    patterns: list[str] = []
    wide_hint = (f", or set {PUBLIC_SUFFIX_OPT_IN}: true in this cluster policy"
                 if tier is Tier.CLUSTER else "")
    internal_hint = (f"set {INTERNAL_HOSTS_OPT_IN}: true in this cluster policy if it is meant"
                     if tier is Tier.CLUSTER else
                     f"a cluster admin can allow it in the cluster policy "
                     f"({INTERNAL_HOSTS_OPT_IN}: true)")
    raw_hosts = raw.get("hosts")
    if raw_hosts is None:
        p.add(f"{where} hosts", "is required: the external hosts this rule allows")
    elif not isinstance(raw_hosts, list) or not raw_hosts:
        p.add(f"{where} hosts", "must be a non-empty list of host names")
    elif len(raw_hosts) > MAX_HOSTS:
        p.add(f"{where} hosts", f"{len(raw_hosts)} hosts, over the limit of {MAX_HOSTS} per rule")
    else:
        for i, host in enumerate(raw_hosts):
            try:
                pattern = hosts.parse_pattern(host)
            except hosts.PatternError as e:
                p.add(f"{where} hosts[{i}]", _host_problem(host, e))
                continue
            loopback = hosts.loopback_problem(pattern)
            if loopback is not None:
                p.add(f"{where} hosts[{i}]", loopback)
                continue
            internal = None if internal_ok else hosts.internal_problem(pattern, cluster_domain)
            if internal is not None:
                p.add(f"{where} hosts[{i}]", f'"{shown(host, quote=False)}" {internal}; '
                      "through the egress gateway it would reach an internal endpoint, not "
                      f"an external host; {internal_hint}")
                continue
            over_wide = None if wide_ok else hosts.public_suffix_problem(pattern)
            if over_wide is not None:
                p.add(f"{where} hosts[{i}]", f'"{shown(host, quote=False)}": {over_wide}; '
                      f"name the hosts{wide_hint}")
                continue
            if pattern not in patterns:
                patterns.append(pattern)
    workloads = _parse_workloads(p, f"{where} workloads", raw.get("workloads"))
    ports = _parse_ports(p, f"{where} ports", raw.get("ports"))
    protocols = _parse_protocols(p, f"{where} protocols", raw.get("protocols"))
    http = _parse_http(p, f"{where} http", raw.get("http"))
    if http is not None and Protocol.HTTP not in protocols:
        p.add(f"{where} http", "applies only to HTTP requests, but protocols excludes HTTP")
    expires_raw = raw.get("expires")
    expires = _parse_expires(p, f"{where} expires", expires_raw)
    owner = raw.get("owner")
    if owner is not None and not isinstance(owner, str):
        p.add(f"{where} owner", f"must be a string, not {_type_name(owner)}")
        owner = None
    if len(p.items) > before:
        return None
    return Rule(
        name=name,
        index=index,
        hosts=tuple(patterns),
        ports=ports,
        protocols=protocols,
        workloads=workloads,
        http=http,
        expires=expires,
        expires_text=None if expires_raw is None else str(expires_raw),
        owner=owner,
    )


def parse_policy_yaml(
    text: str, source: ConfigMapRef, *, tier: Tier, resource_version: str = "", uid: str = "",
    cluster_domain: str = hosts.DEFAULT_CLUSTER_DOMAIN,
) -> NamespacePolicy:
    """The `policy.yaml` document of one ConfigMap; raises PolicyError.

    `cluster_domain` is the cluster's DNS domain: hosts under it are internal."""
    p = _Problems(str(source))
    try:
        doc = load_one(text, POLICY_LIMITS)
    except YamlError as e:
        raise PolicyError(
            str(source),
            [f"{source} {POLICY_DATA_KEY}: bad YAML{e.where}: {e.problem}"],
            # 0-based, as the file sources expect it
            (e.line - 1, (e.column or 1) - 1, e.problem) if e.line is not None else None,
        ) from e
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise PolicyError(
            str(source), [f"{source} {POLICY_DATA_KEY}: must be a map, not {_type_name(doc)}"]
        )
    cluster = tier is Tier.CLUSTER
    allowed = CLUSTER_TOP_FIELDS if cluster else TOP_FIELDS
    for key in doc:
        if key in ("deny", *OPT_INS) and not cluster:
            p.add(
                key,
                f"{key!r} is only allowed in the cluster policy "
                f"(label {TIER_LABEL}: {TIER_CLUSTER}); namespace policies only allow",
            )
        elif key not in allowed:
            p.add("", f"unknown field {shown(key)}; allowed: {', '.join(allowed)}")
    opted = {key: _opt_in(p, doc, key) and cluster for key in OPT_INS}
    mode_raw = doc.get("mode", Mode.ENFORCE.value)
    try:  # type first: Enum's own error would repr() the whole value
        if not isinstance(mode_raw, str):
            raise ValueError("not a string")
        mode = Mode(mode_raw)
    except ValueError:
        p.add("mode", f"{shown(mode_raw)} is not a mode; allowed: enforce, audit")
        mode = Mode.ENFORCE
    rules: list[Rule] = []
    raw_rules = doc.get("rules", [])
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        p.add("rules", f"must be a list, not {_type_name(raw_rules)}")
        raw_rules = []
    if len(raw_rules) > MAX_RULES:
        p.add("rules", f"{len(raw_rules)} rules, over the limit of {MAX_RULES} per ConfigMap; "
              "split them over several ConfigMaps")
        raw_rules = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_rules):
        rule = _parse_rule(p, i, raw, tier=tier, wide_ok=opted[PUBLIC_SUFFIX_OPT_IN],
                           internal_ok=opted[INTERNAL_HOSTS_OPT_IN],
                           cluster_domain=cluster_domain)
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str):
            if name in seen:
                p.add(
                    f'rules[{i}] "{shown(name, quote=False)}" name',
                    f"duplicates rules[{seen[name]}]; names must be unique",
                )
            seen.setdefault(name, i)
        if rule is not None:
            rules.append(rule)
    deny: list[str] = []
    if cluster and "deny" in doc:
        raw_deny = doc["deny"]
        if not isinstance(raw_deny, list):
            p.add("deny", f"must be a list of host names, not {_type_name(raw_deny)}")
        else:
            for i, host in enumerate(raw_deny):
                try:
                    pattern = hosts.parse_pattern(host, allow_any=True)
                except hosts.PatternError as e:
                    p.add(f"deny[{i}]", _host_problem(host, e))
                    continue
                if pattern not in deny:
                    deny.append(pattern)
    if p.items:
        raise PolicyError(str(source), p.items)
    return NamespacePolicy(
        source=source,
        tier=tier,
        mode=mode,
        rules=tuple(rules),
        deny=tuple(deny),
        resource_version=resource_version,
        uid=uid,
    )


def _opt_in(p: _Problems, doc: Mapping[str, Any], key: str) -> bool:
    """A cluster admin's boolean opt-in; anything but true or false is an error."""
    value = doc.get(key, False)
    if not isinstance(value, bool):
        p.add(key, f"must be true or false, not {_type_name(value)}")
    return value is True


def _map(value: Any) -> Mapping[str, Any]:
    """`value` if it is a map, else an empty one: manifests on disk may hold anything
    (`metadata: teamc`), and the shape is reported, not crashed on."""
    return value if isinstance(value, Mapping) else {}


def configmap_ref(obj: Mapping[str, Any]) -> ConfigMapRef:
    """namespace/name of a ConfigMap dict; odd values are shown bounded, never trusted."""
    meta = _map(obj.get("metadata"))
    name, namespace = meta.get("name") or "<unnamed>", meta.get("namespace") or "default"
    return ConfigMapRef(
        namespace if isinstance(namespace, str) and len(namespace) <= 63 else shown(namespace),
        name if isinstance(name, str) and len(name) <= 253 else shown(name),
    )


def is_policy_configmap(obj: Mapping[str, Any]) -> bool:
    """Whether a ConfigMap is one we read: policy label, or the cluster tier."""
    labels = _map(_map(obj.get("metadata")).get("labels"))
    return labels.get(POLICY_LABEL) == "true" or labels.get(TIER_LABEL) == TIER_CLUSTER


def parse_configmap(obj: Mapping[str, Any], *, cluster_namespace: str,
                    cluster_domain: str = hosts.DEFAULT_CLUSTER_DOMAIN) -> NamespacePolicy:
    """A ConfigMap (dict, as from YAML or the API) -> NamespacePolicy; raises PolicyError."""
    meta = _map(obj.get("metadata"))
    source = configmap_ref(obj)
    namespace = source.namespace
    if not isinstance(obj.get("metadata"), Mapping) or not _DNS_LABEL.match(namespace):
        raise PolicyError(
            str(source),
            [f"{source}: metadata must be a map with a valid namespace and name"],
        )
    labels = _map(meta.get("labels"))
    tier = Tier.CLUSTER if labels.get(TIER_LABEL) == TIER_CLUSTER else Tier.NAMESPACE
    if tier is Tier.CLUSTER and namespace != cluster_namespace:
        raise PolicyError(
            str(source),
            [
                f"{source}: cluster-tier policies are read only from the service's namespace "
                f"{cluster_namespace!r}; move it there or drop the {TIER_LABEL} label"
            ],
        )
    if labels.get(TIER_LABEL) not in (None, TIER_CLUSTER):
        raise PolicyError(
            str(source),
            [
                f"{source}: label {TIER_LABEL}={shown(labels.get(TIER_LABEL))} is unknown; "
                f"the only tier is {TIER_CLUSTER!r}"
            ],
        )
    data = _map(obj.get("data"))
    if POLICY_DATA_KEY not in data:
        keys = shown(", ".join(sorted(map(str, data))), quote=False) or "none"
        raise PolicyError(
            str(source),
            [f"{source}: no data key {POLICY_DATA_KEY!r} (keys present: {keys})"],
        )
    text = data[POLICY_DATA_KEY]
    if not isinstance(text, str):
        raise PolicyError(
            str(source),
            [f"{source} {POLICY_DATA_KEY}: must be a YAML string (use '|' in the ConfigMap)"],
        )
    return parse_policy_yaml(
        text,
        source,
        tier=tier,
        resource_version=str(meta.get("resourceVersion") or ""),
        uid=str(meta.get("uid") or ""),
        cluster_domain=cluster_domain,
    )
