"""Squid `http_access` / `ssl_bump` allowlists (dstdomain, ssl::server_name) -> our rules.

Squid's documented rules (squid.conf reference, http://www.squid-cache.org/Doc/config/acl/,
/http_access/, /ssl_bump/):
- `dstdomain .foo.com` matches foo.com and every subdomain; `foo.com` only
  that name (-> `foo.com` + `*.foo.com`, or `foo.com`). `ssl::server_name`
  takes the same values and matches the TLS server name (SNI, or the
  CONNECT target when there is none).
- `http_access allow|deny [!]acl ...`: the ACLs on one line are ANDed, the
  first matching line decides; when none matches, the answer is the opposite
  of the last line (no lines: deny).
- `ssl_bump ACTION [!]acl ...`: the first matching action; `splice`
  tunnels without decrypting, which is what our TLS passthrough does; with
  no matching rule Squid splices. `peek`/`stare` only look; `bump`
  decrypts (we cannot see inside TLS, so those hosts are not allowed as
  TLS) and `terminate` closes.
- Forward-proxy TLS is a CONNECT request: method CONNECT is our TLS, any
  other method our HTTP.

Translation, never wider: each allow line becomes a rule (its domains, its
ports, its protocol), then every deny line above it takes away what it may
match: ports when it covers every host of the rule, else the overlapping
host patterns. Conditions we cannot express drop an allow line and always
count as matching in a deny line. Squid has no workload identity: the
imported workloads are taken to be a client matching every client ACL
(src, proxy_auth, ...), so `allow localnet X` applies and `deny !localnet`
does not; the rules go to `--namespace` or the cluster tier.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    CLUSTER,
    DEFAULT_HTTP_PORT,
    DEFAULT_TLS_PORT,
    DraftRule,
    ImportError_,
    Outcome,
    Translation,
    configmap_name,
    covers,
    intersect,
    overlaps,
    port_list,
    rule_name,
    shown,
)
from .inputs import files_under, read_text

DOMAIN_TYPES = ("dstdomain", "ssl::server_name")
CLIENT_TYPES = (
    "src", "srcdomain", "srcdom_regex", "arp", "eui64", "proxy_auth", "proxy_auth_regex",
    "ident", "ident_regex", "ext_user", "ext_user_regex", "user_cert", "ca_cert", "localport",
    "myportname", "myip", "localip", "client_connection_mark", "max_user_ip", "maxconn",
)  # fmt: skip
SPLICE = ("splice", "none")
LOOK = ("peek", "stare")
PROTOS = frozenset({"TLS", "HTTP"})


@dataclass
class Acl:
    type: str
    values: list[str] = field(default_factory=list)
    line: int = 0


@dataclass
class Line:
    directive: str  # http_access or ssl_bump
    action: str
    conditions: list[tuple[bool, str]]  # (negated, acl name)
    text: str
    number: int


def parse_domain(value: str) -> list[str]:
    v = value.strip().lower().rstrip(".")
    if v.startswith("."):
        return [v[1:], "*" + v]
    return [v]


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def parse_conf(text: str, base: Path) -> tuple[dict[str, Acl], list[Line], list[tuple[int, str]]]:
    """ACLs, access lines, and (line, problem) for what cannot be read."""
    acls: dict[str, Acl] = {
        "all": Acl("all"),
        "CONNECT": Acl("method", ["CONNECT"]),
        "localhost": Acl("src", ["127.0.0.1/32", "::1"]),
        "manager": Acl("url_regex"),
        "to_localhost": Acl("dst"),
        "to_linklocal": Acl("dst"),
    }
    predefined = set(acls)
    lines: list[Line] = []
    problems: list[tuple[int, str]] = []
    joined: list[tuple[int, str]] = []
    pending, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        joined.append((start, pending + raw))
        pending = ""
    for n, raw in joined:
        words = []
        for w in raw.split():
            if w.startswith("#"):
                break
            words.append(w)
        if not words:
            continue
        directive = words[0]
        if directive == "include":
            problems.append((n, "include is not followed: pass the included files instead"))
        elif directive == "acl" and len(words) >= 3:
            name, kind = words[1], words[2]
            values = []
            for w in words[3:]:
                if w.startswith("-") or w.startswith("+"):
                    continue  # options such as -i, -n, --client-requested
                if w.startswith('"') and w.endswith('"') and len(w) > 1:
                    path = (base / w.strip('"')).resolve()
                    try:
                        if not path.is_relative_to(base.resolve()):
                            # A config from elsewhere must not make us echo any file.
                            raise ImportError_("outside the directory of the squid.conf")
                        content = read_text(path)
                    except ImportError_ as e:
                        problems.append((n, f"acl {name}: cannot read {shown(w)}: {e}"))
                        kind = "unreadable-file"
                        continue
                    values += [v for v in (x.split("#")[0].strip() for x in content.splitlines())
                               if v]
                else:
                    values.append(w)
            if name in acls and name not in predefined and acls[name].type != kind:
                problems.append((n, f"acl {name} is {kind} here and {acls[name].type} before"))
                kind = "conflicting-types"
            if name in predefined or name not in acls:
                acls[name] = Acl(kind, values, n)
            else:
                acls[name].values.extend(values)
                if kind == "unreadable-file":
                    acls[name].type = kind
        elif directive in ("http_access", "ssl_bump") and len(words) >= 2:
            conds = [(w.startswith("!"), w.lstrip("!")) for w in words[2:]]
            lines.append(Line(directive, words[1], conds, " ".join(words), n))
    return acls, lines, problems


# --------------------------------------------------------------------------
# Regions: what one line may match, over hosts x ports x protocols.


@dataclass
class Region:
    hosts: tuple[str, list[str]] = ("all", [])  # ("all"|"in"|"out", patterns)
    ports: tuple[str, set[int]] = ("all", set())
    protos: frozenset[str] = PROTOS
    never: bool = False  # a condition that is false for the imported workloads
    # `!acl` domain conditions: names they cover make the line not match
    negated: list[str] = field(default_factory=list)


def _ports_of(values: list[str]) -> set[int] | None:
    out: set[int] = set()
    for v in values:
        lo, _, hi = v.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None
        a, b = int(lo), int(hi or lo)
        if b - a > 65535 or not 0 < a <= b <= 65535:
            return None
        out.update(range(a, b + 1))
    return out


def deny_region(line: Line, acls: dict[str, Acl]) -> Region:
    """Everything a deny (or non-splice ssl_bump) line may match: over-approximated."""
    r = Region()
    negated_hosts: list[str] = []
    for neg, name in line.conditions:
        acl = acls.get(name, Acl("undefined"))
        if acl.type == "all" or acl.type in CLIENT_TYPES:
            if neg:
                r.never = True  # the imported workloads match every client ACL
            continue
        if acl.type in DOMAIN_TYPES:
            pats = [p for v in acl.values if not _is_ip(v) for p in parse_domain(v)]
            if neg:
                negated_hosts += pats
            elif r.hosts[0] == "in":
                r.hosts = ("in", [x for a in r.hosts[1] for b in pats if (x := intersect(a, b))])
            else:
                r.hosts = ("in", pats)
        elif acl.type == "port" and (ports := _ports_of(acl.values)) is not None:
            r.ports = ("out", ports) if neg else ("in", ports)
        elif acl.type == "method":
            methods = {v.upper() for v in acl.values}
            if methods == {"CONNECT"}:
                r.protos = frozenset({"HTTP"}) if neg else frozenset({"TLS"})
            elif not neg:
                r.protos = frozenset({"HTTP"} | ({"TLS"} if "CONNECT" in methods else set()))
        # anything else may match: stays over-approximated
    if r.hosts[0] == "all" and negated_hosts:
        r.hosts = ("out", negated_hosts)
    r.negated = negated_hosts
    return r


@dataclass
class Candidate:
    hosts: list[str]
    ports: set[int]
    protos: frozenset[str]
    methods: list[str] | None
    narrowed: list[str] = field(default_factory=list)


def _host_overlap(c: Candidate, r: Region) -> tuple[list[str], bool]:
    """(candidate patterns the region may match, whether it matches all of them fully)."""
    kind, pats = r.hosts
    if kind == "all":
        return list(c.hosts), True
    if kind == "in":
        hit = [p for p in c.hosts if any(overlaps(p, s) for s in pats)]
        full = all(any(covers(s, p) for s in pats) for p in c.hosts)
        return hit, full
    hit = [p for p in c.hosts if not any(covers(s, p) for s in pats)]
    full = not any(overlaps(p, s) for p in c.hosts for s in pats)
    return hit, full


def _port_hit(ports: set[int], r: Region) -> set[int]:
    kind, pts = r.ports
    return set(ports) if kind == "all" else ports & pts if kind == "in" else ports - pts


def subtract(c: Candidate, r: Region, why: str) -> list[Candidate]:
    """What of `c` survives a deny line matching region `r`: never more than the truth."""
    if r.never:
        return [c]
    hosts_hit, full = _host_overlap(c, r)
    ports_hit = _port_hit(c.ports, r)
    protos_hit = c.protos & r.protos
    if not hosts_hit or not ports_hit or not protos_hit:
        return [c]
    if full:
        out = []
        inside = Candidate(list(c.hosts), c.ports - ports_hit, protos_hit, c.methods,
                           [*c.narrowed, f"ports {sorted(ports_hit)} denied by {why}"])
        if inside.ports:
            out.append(inside)
        if c.protos - r.protos:
            out.append(Candidate(list(c.hosts), set(c.ports), c.protos - r.protos, c.methods,
                                 c.narrowed))
        return out
    kept = [p for p in c.hosts if p not in hosts_hit]
    note = f"{', '.join(hosts_hit)} dropped: {why} may deny part of them"
    return [Candidate(kept, c.ports, c.protos, c.methods, [*c.narrowed, note])] if kept else []


def allow_candidate(line: Line, acls: dict[str, Acl]) -> tuple[Candidate | None, str]:
    """The rule one allow line asks for, or None and why not."""
    hosts: list[str] | None = None
    ports: set[int] | None = None
    protos, methods, excluded = PROTOS, None, []
    for neg, name in line.conditions:
        acl = acls.get(name)
        if acl is None:
            return None, f"acl {shown(name)} is not defined"
        if acl.type == "all" or acl.type in CLIENT_TYPES:
            if neg:
                return None, f"!{shown(name)} never matches the imported workloads"
            continue
        if acl.type in DOMAIN_TYPES:
            pats = [p for v in acl.values if not _is_ip(v) for p in parse_domain(v)]
            if neg:
                excluded += pats
                continue
            hosts = pats if hosts is None else [
                x for a in hosts for b in pats if (x := intersect(a, b))
            ]
            if acl.type == "ssl::server_name":
                protos = protos & {"TLS"}  # a server name is a TLS notion: HTTP not assumed
        elif acl.type == "port":
            got = _ports_of(acl.values)
            if got is None:
                return None, f"port acl {shown(name)} has values that are not ports"
            if neg:
                base_ports = ports if ports is not None else {DEFAULT_TLS_PORT, DEFAULT_HTTP_PORT}
                ports = base_ports - got
            else:
                ports = got if ports is None else ports & got
        elif acl.type == "method":
            ms = {v.upper() for v in acl.values}
            if neg and ms == {"CONNECT"}:
                protos = protos & {"HTTP"}
            elif neg:
                return None, f"!{shown(name)} (methods) has no equivalent"
            else:
                protos = protos & ({"TLS"} if "CONNECT" in ms else set()) | (
                    protos & {"HTTP"} if ms - {"CONNECT"} else set())
                if ms - {"CONNECT"}:
                    methods = sorted(ms - {"CONNECT"})
        else:
            return None, (f"acl {shown(name)} ({shown(acl.type)}) has no equivalent; without it "
                          "the rule would allow more")
    if hosts is None:
        return None, "no dstdomain or ssl::server_name: it allows every host, which egress-authz " \
                     "refuses (name the hosts)"
    if any(overlaps(p, x) for p in hosts for x in excluded):
        hosts = [p for p in hosts if not any(overlaps(p, x) for x in excluded)]
    if not hosts or not protos:
        return None, "it matches no host or no protocol we carry"
    narrowed = []
    if ports is None:
        ports = ({DEFAULT_TLS_PORT} if "TLS" in protos else set()) | (
            {DEFAULT_HTTP_PORT} if "HTTP" in protos else set())
        narrowed.append(f"no port acl (every port) is imported as {sorted(ports)}")
    elif len(ports) > 64:
        listed, _ = port_list(1, 65535)
        ports = ports & set(listed)
        narrowed.append("a wide port list is imported as the common ports in it")
    return Candidate(hosts, ports, frozenset(protos), methods, narrowed), ""


def spliced(pattern: str, bumps: list[Line], acls: dict[str, Acl]) -> str:
    """"" when Squid splices every name of `pattern`, else why it may not."""
    for line in bumps:
        if line.action in LOOK:
            continue
        region = deny_region(line, acls)
        if region.never:
            continue
        kind, pats = region.hosts
        hit = kind == "all" or (kind == "in" and any(overlaps(pattern, s) for s in pats)) or (
            kind == "out" and not any(covers(s, pattern) for s in pats))
        if line.action in SPLICE:
            known = all(
                acls.get(n, Acl("?")).type in (*DOMAIN_TYPES, "all", "at_step", *CLIENT_TYPES)
                for _, n in line.conditions
            )
            full = kind == "all" or (kind == "in" and any(covers(s, pattern) for s in pats))
            # `splice d1 !d2`: no name of `pattern` that d2 may match is spliced by it
            full = full and not any(overlaps(pattern, s) for s in region.negated)
            if known and full and "TLS" in region.protos:
                return ""
            continue
        if hit:
            return f"ssl_bump {line.action} (line {line.number}) may apply to it first"
    return ""  # no rule matched: Squid splices


def translate(paths: list[str], options: Any) -> Translation:
    t = Translation()
    ns = options.namespace or CLUSTER
    who = (f"every workload of namespace {ns}" if ns else
           "every workload of every namespace (the cluster tier)")
    for path in files_under(paths, (".conf",)):
        acls, lines, problems = parse_conf(read_text(path), path.parent)
        cm = configmap_name("squid", path.stem)
        anchor = (ns, cm)
        for n, problem in problems:
            t.note(f"{path}:{n}", Outcome.DROPPED, problem, anchor)
        access = [x for x in lines if x.directive == "http_access"]
        bumps = [x for x in lines if x.directive == "ssl_bump"]
        for name, acl in acls.items():
            if acl.type in ("dst", "dstdom_regex", "url_regex", "urlpath_regex") and acl.line:
                t.note(f"{path}:{acl.line} acl {shown(name)} {acl.type}", Outcome.DROPPED,
                       "addresses and regular expressions are not translated; lines that "
                       "allow with it are dropped, lines that deny with it count as matching",
                       anchor)
            if acl.type in DOMAIN_TYPES:
                for v in acl.values:
                    if _is_ip(v):
                        t.note(f"{path}:{acl.line} acl {shown(name)} {shown(v)}",
                               Outcome.DROPPED, "an IP address: egress-authz decides by name",
                               anchor)
        for i, line in enumerate(access):
            where = f"{path}:{line.number} {shown(line.text)}"
            if line.action == "deny":
                continue
            if line.action != "allow":
                t.note(where, Outcome.DROPPED, f"unknown action {shown(line.action)}", anchor)
                continue
            cand, why = allow_candidate(line, acls)
            if cand is None:
                t.note(where, Outcome.DROPPED, why, anchor)
                continue
            survivors = [cand]
            for earlier in access[:i]:
                if earlier.action != "deny":
                    continue
                region = deny_region(earlier, acls)
                label = f"line {earlier.number} ({shown(earlier.text)})"
                survivors = [s for c in survivors for s in subtract(c, region, label)]
            final: list[Candidate] = []
            for c in survivors:
                if "TLS" not in c.protos or not bumps:
                    final.append(c)
                    continue
                ok = [p for p in c.hosts if not spliced(p, bumps, acls)]
                gone = [f"{p}: {spliced(p, bumps, acls)}" for p in c.hosts if p not in ok]
                if ok:
                    final.append(Candidate(ok, c.ports, frozenset({"TLS"}), c.methods,
                                           [*c.narrowed, *gone]))
                if "HTTP" in c.protos:
                    final.append(Candidate(c.hosts, c.ports, frozenset({"HTTP"}), c.methods,
                                           c.narrowed))
            if not final:
                t.note(where, Outcome.DROPPED, "earlier deny or ssl_bump lines take all of it",
                       anchor)
                continue
            reasons = sorted({x for c in final for x in c.narrowed})
            reasons.append(f"applies to {who}")
            lossy = any(c.narrowed for c in final) or set(cand.hosts) - {
                p for c in final for p in c.hosts}
            note = t.note(where, Outcome.NARROWER if lossy else Outcome.EXACT,
                          "; ".join(reasons), anchor)
            # `http.methods` only narrows HTTP: a CONNECT part gets its own rule.
            split = [
                part
                for c in final
                for part in (
                    [Candidate(c.hosts, c.ports, frozenset({"TLS"}), None, c.narrowed),
                     Candidate(c.hosts, c.ports, frozenset({"HTTP"}), c.methods, c.narrowed)]
                    if c.methods and c.protos == PROTOS else [c]
                )
            ]
            for k, c in enumerate(split):
                draft = DraftRule(
                    ns, cm, rule_name(f"line{line.number}", k if len(split) > 1 else ""), [],
                    sorted(c.ports), sorted(c.protos),
                    methods=c.methods if c.protos == {"HTTP"} else None,
                )
                t.rules.append(draft)
                for p in c.hosts:
                    t.allow(draft, p, note)
        last = access[-1] if access else None
        if last and last.action == "deny" and not all(
            acls.get(n, Acl("?")).type == "all" and not neg for neg, n in last.conditions
        ):
            t.note(f"{path}: after line {last.number}", Outcome.DROPPED,
                   "the last http_access line denies, so Squid allows whatever no line matched; "
                   "egress-authz denies it (add `http_access deny all` to say so)", anchor)
    return t
