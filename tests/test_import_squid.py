"""`egress-authz import --from squid`: http_access/ssl_bump allowlists, never wider than Squid."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.import_helpers import (
    Judge,
    hostnames,
    import_objects,
    lint_output,
    near,
    outcome_of,
)

# --------------------------------------------------------------------------
# Squid, evaluated on one concrete request from its documentation
# (squid.conf acl / http_access / ssl_bump): dstdomain `.x` matches x and every
# subdomain, `x` only x; ACLs on a line are ANDed, the first matching line
# decides, else the opposite of the last line (no lines: deny); TLS through
# a forward proxy is CONNECT, and ssl_bump's first matching action must be
# splice (the default when none matches; peek/stare only look). The imported
# workloads are a client matching every client ACL (src); `time` is not known
# to the importer and is decided here by the request.


@dataclass(frozen=True)
class Request:
    host: str
    port: int
    protocol: str  # TLS or HTTP
    method: str
    in_hours: bool


def squid_domain(value: str, host: str) -> bool:
    v = value.lower()
    return host == v[1:] or host.endswith(v) if v.startswith(".") else host == v


def acl_true(acl: tuple[str, list[str]], r: Request) -> bool:
    kind, values = acl
    if kind in ("all", "src"):
        return True
    if kind in ("dstdomain", "ssl::server_name"):
        return any(squid_domain(v, r.host) for v in values)
    if kind == "port":
        return str(r.port) in values
    if kind == "method":
        return ("CONNECT" if r.protocol == "TLS" else r.method) in values
    if kind == "time":
        return r.in_hours
    if kind == "at_step":
        return True
    raise AssertionError(kind)


def line_matches(conds: list[str], acls: dict[str, tuple[str, list[str]]], r: Request) -> bool:
    return all(acl_true(acls[c.lstrip("!")], r) != c.startswith("!") for c in conds)


def squid_allows(conf: Conf, r: Request) -> bool:
    verdict = None
    for action, conds in conf.access:
        if line_matches(conds, conf.acls, r):
            verdict = action == "allow"
            break
    if verdict is None:
        verdict = bool(conf.access) and conf.access[-1][0] == "deny"
    if not verdict or r.protocol != "TLS":
        return verdict
    for action, conds in conf.bump:
        if action in ("peek", "stare"):
            continue
        if line_matches(conds, conf.acls, r):
            return action == "splice"
    return True


@dataclass
class Conf:
    acls: dict[str, tuple[str, list[str]]]
    access: list[tuple[str, list[str]]]
    bump: list[tuple[str, list[str]]]

    def text(self) -> str:
        out = [f"acl {name} {kind} {' '.join(values)}".rstrip()
               for name, (kind, values) in self.acls.items() if kind != "all"]
        out += [f"http_access {a} {' '.join(c)}".rstrip() for a, c in self.access]
        out += [f"ssl_bump {a} {' '.join(c)}".rstrip() for a, c in self.bump]
        return "\n".join(out) + "\n"


DOCUMENTED = """\
# From Squid's default squid.conf, with an allowlist added.
acl localnet src 10.0.0.0/8     # RFC 1918 local private network (LAN)
acl SSL_ports port 443
acl Safe_ports port 80          # http
acl Safe_ports port 443         # https
acl Safe_ports port 1025-65535  # unregistered ports
acl CONNECT method CONNECT
acl allowed dstdomain .kadath.io api.leng.com
acl partners dstdomain .celephais.io
acl officehours time MTWHF 08:00-18:00
acl nosplice ssl::server_name secret.leng.com
acl step1 at_step SslBump1
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access allow localnet allowed
http_access allow localnet partners officehours
http_access deny all
ssl_bump peek step1
ssl_bump bump nosplice
ssl_bump splice all
"""


class TestDocumented:
    def test_default_config_with_an_allowlist(self, tmp_path, capsys) -> None:
        """Safe_ports/SSL_ports narrow the ports; `time` drops its line; dstdomain carries over."""
        result = import_objects("squid", {"squid.conf": DOCUMENTED}, namespace="shop")
        assert outcome_of(result, "allow localnet allowed") == "narrower"
        assert outcome_of(result, "partners officehours") == "not-translatable"
        judge = Judge(result)
        assert judge.allows("kadath.io", 443) and judge.allows("a.b.kadath.io", 443)
        assert judge.allows("api.leng.com", 80, "HTTP")
        assert not judge.allows("api.leng.com", 80)  # CONNECT only to SSL_ports
        assert not judge.allows("x.celephais.io", 443)
        assert not judge.allows("api.leng.com", 443, namespace="web")
        lint_output(result, tmp_path, capsys)

    def test_leading_dot_means_apex_and_subdomains(self) -> None:
        """`.foo.com` matches foo.com and www.foo.com; `foo.com` only foo.com."""
        assert squid_domain(".foo.com", "foo.com") and squid_domain(".foo.com", "www.foo.com")
        assert not squid_domain("foo.com", "www.foo.com")
        conf = "acl a dstdomain .foo.com bar.com\nhttp_access allow a\nhttp_access deny all\n"
        judge = Judge(import_objects("squid", {"squid.conf": conf}, namespace="shop"))
        assert judge.allows("foo.com", 443) and judge.allows("www.foo.com", 443)
        assert judge.allows("bar.com", 443) and not judge.allows("www.bar.com", 443)

    def test_ssl_bump_bump_removes_the_tls_allow(self) -> None:
        """A host Squid would bump (decrypt) is not allowed as TLS passthrough."""
        conf = ("acl a ssl::server_name .foo.com\nacl b ssl::server_name secret.foo.com\n"
                "http_access allow a\nhttp_access deny all\nssl_bump bump b\nssl_bump splice a\n")
        result = import_objects("squid", {"squid.conf": conf}, namespace="shop")
        judge = Judge(result)
        assert judge.allows("foo.com", 443)
        assert not judge.allows("secret.foo.com", 443)
        assert not judge.allows("www.foo.com", 443)  # *.foo.com overlaps the bumped name
        assert not judge.allows("foo.com", 80, "HTTP")  # ssl::server_name: TLS only

    def test_what_cannot_be_carried_is_reported(self) -> None:
        """IP destinations, allow-all lines, includes and an open default are each reported."""
        conf = ("include /etc/squid/more.conf\nacl ips dst 1.2.3.4\nacl a dstdomain 5.6.7.8 x.io\n"
                "acl localnet src 10.0.0.0/8\nhttp_access allow localnet\n"
                "http_access allow a\nhttp_access deny ips\n")
        result = import_objects("squid", {"squid.conf": conf}, namespace="shop")
        assert outcome_of(result, "squid.conf:1") == "not-translatable"
        assert outcome_of(result, "acl ips dst") == "not-translatable"
        assert outcome_of(result, "acl a 5.6.7.8") == "not-translatable"
        assert outcome_of(result, "http_access allow localnet") == "not-translatable"
        assert outcome_of(result, "after line 7") == "not-translatable"

    def test_acl_files_outside_the_config_directory_are_not_read(self, tmp_path) -> None:
        """A quoted ACL file elsewhere on disk is refused, never echoed."""
        conf = 'acl a dstdomain "/etc/passwd"\nhttp_access allow a\nhttp_access deny all\n'
        result = import_objects("squid", {"squid.conf": conf}, namespace="shop")
        assert not result.configmaps
        assert any("outside the directory" in n.reason for n in result.notes)


acl_defs = st.fixed_dictionaries({
    "d1": st.tuples(st.just("dstdomain"), st.lists(
        st.one_of(hostnames, hostnames.map(lambda h: "." + h)), min_size=1, max_size=3)),
    "d2": st.tuples(st.sampled_from(["dstdomain", "ssl::server_name"]), st.lists(
        st.one_of(hostnames, hostnames.map(lambda h: "." + h)), min_size=1, max_size=2)),
    "p": st.tuples(st.just("port"), st.lists(st.sampled_from(["80", "443", "8080"]),
                                             min_size=1, max_size=2, unique=True)),
    "CONNECT": st.just(("method", ["CONNECT"])),
    "GETS": st.just(("method", ["GET"])),
    "localnet": st.just(("src", ["10.0.0.0/8"])),
    "hours": st.just(("time", ["MTWHF", "08:00-18:00"])),
    "all": st.just(("all", [])),
})
conds = st.lists(
    st.builds(lambda neg, name: ("!" if neg else "") + name, st.booleans(),
              st.sampled_from(["d1", "d2", "p", "CONNECT", "GETS", "localnet", "hours", "all"])),
    max_size=3,
)
allow_lines = st.tuples(
    st.just("allow"),
    st.builds(lambda d, rest: [d, *rest], st.sampled_from(["d1", "d2"]), conds),
)
deny_lines = st.tuples(st.just("deny"), conds.filter(bool))
confs = st.builds(
    Conf,
    acl_defs,
    st.lists(st.one_of(allow_lines, allow_lines, deny_lines), min_size=1, max_size=5),
    st.lists(st.tuples(st.sampled_from(["splice", "bump", "peek", "terminate"]), conds),
             max_size=3),
)
def requests(conf: Conf) -> st.SearchStrategy[list[Request]]:
    names = conf.acls["d1"][1] + conf.acls["d2"][1]
    return st.lists(
        st.builds(Request, near(names), st.sampled_from([80, 443, 8080]),
                  st.sampled_from(["TLS", "HTTP"]), st.sampled_from(["GET", "POST"]),
                  st.booleans()),
        min_size=1, max_size=12,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(confs, st.data())
def test_never_allows_what_squid_denies(conf: Conf, data: st.DataObject) -> None:
    """For generated squid.conf files and requests, an imported allow is a Squid allow."""
    judge = Judge(import_objects("squid", {"squid.conf": conf.text()}, namespace="shop"))
    for r in data.draw(requests(conf)):
        if judge.allows(r.host, r.port, r.protocol, method=r.method):
            assert squid_allows(conf, r), (conf.text(), r)


def test_methods_narrow_http_only() -> None:
    """`method CONNECT GET`: TLS (CONNECT) allowed as such, HTTP only for GET."""
    conf = ("acl a dstdomain api.kadath.io\nacl m method CONNECT GET\n"
            "http_access allow a m\nhttp_access deny all\n")
    judge = Judge(import_objects("squid", {"squid.conf": conf}, namespace="shop"))
    assert judge.allows("api.kadath.io", 443)
    assert judge.allows("api.kadath.io", 80, "HTTP", method="GET")
    assert not judge.allows("api.kadath.io", 80, "HTTP", method="POST")


def test_splice_with_a_negated_domain_does_not_splice_it() -> None:
    """`ssl_bump splice d1 !d1` never matches, so the `bump` after it takes kadath.io's TLS
    (found by the property test): TLS is not imported, plain HTTP still is."""
    conf = ("acl d1 dstdomain kadath.io\nhttp_access allow d1\n"
            "ssl_bump splice d1 !d1\nssl_bump bump\n")
    judge = Judge(import_objects("squid", {"squid.conf": conf}, namespace="shop"))
    assert not judge.allows("kadath.io", 443)
    assert not judge.allows("kadath.io", 80, "TLS")
    assert judge.allows("kadath.io", 80, "HTTP", method="GET")
