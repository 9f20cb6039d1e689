"""Path rules match the normalized path; ambiguous paths are denied (issue 10, item 8)."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.engine import compile_policy, decide
from authz.model import (
    ConfigMapRef,
    Destination,
    HttpMatch,
    Identity,
    Mode,
    NamespacePolicy,
    PolicySet,
    Protocol,
    Reason,
    Rule,
    Tier,
    Verdict,
)
from authz.paths import normalize_path
from authz.policy import PolicyError, parse_configmap


def snapshot(mode: Mode = Mode.ENFORCE):  # type: ignore[no-untyped-def]
    rule = Rule(name="v1", index=0, hosts=("api.kadath.io",), ports=frozenset({80}),
                http=HttpMatch(paths=("/v1/",)))
    policy = NamespacePolicy(ConfigMapRef("shop", "p"), Tier.NAMESPACE, mode, (rule,))
    return compile_policy(PolicySet((policy,), revision=1))


def verdict(path: str, mode: Mode = Mode.ENFORCE) -> tuple[Verdict, Reason]:
    d = decide(snapshot(mode), Identity("spiffe://cluster.local/ns/shop/sa/cart"),
               Destination(port=80, protocol=Protocol.HTTP, http_host="api.kadath.io",
                           method="GET", path=path))
    return d.verdict, d.reason


ATTACKS = [
    "/v1/..;/admin",  # Tomcat/Spring drop ';' params, then resolve '..'
    "/v1/%252e%252e/admin",  # decoded twice: '..'
    "/v1/%c0%ae%c0%ae/admin",  # overlong UTF-8 for '.'
    "/v1/%2e%2e/admin", "/v1/.%2E/admin", "/v1/%2e./admin",  # escaped dot segments
    "/v1/..;jsessionid=x/admin", "/v1/.;/admin",
    "/v1/%2fadmin", "/v1/..%2fadmin", "/v1/%2F..%2Fadmin", "/v1/%5c..%5cadmin",  # escaped / \
    "/v1\\..\\admin", "/v1/\\../admin",
    "/v1//../admin",  # merge slashes first or not: /v1/admin or /v1/
    "/v1/%00/admin", "/v1/%0a", "/v1/%7f",
    "/v1/%zz", "/v1/%", "/v1/%4", "/v1/a b", "/v1/\x00", "/v1/caf\u00e9",
    "v1/x", "*", "", "http://api.kadath.io/v1/x",
]


class TestAttacks:
    @pytest.mark.parametrize("path", ATTACKS)
    def test_ambiguous_denied(self, path: str) -> None:
        """Each attack spelling against a `/v1/` prefix rule is denied path-not-normalized
        (the first three are the issue's; they used to be allowed)."""
        assert normalize_path(path) is None
        assert verdict(path) == (Verdict.DENY, Reason.PATH_NOT_NORMALIZED)

    @pytest.mark.parametrize("path", ATTACKS[:3])
    def test_audit_mode_does_not_lift(self, path: str) -> None:
        """An ambiguous path is a request-level problem: audit mode still denies it."""
        assert verdict(path, Mode.AUDIT) == (Verdict.DENY, Reason.PATH_NOT_NORMALIZED)

    def test_resolved_traversal_is_not_allowed(self) -> None:
        """A literal '..' resolves the same for everyone: /v1/../admin is /admin."""
        assert normalize_path("/v1/../admin") == "/admin"
        assert verdict("/v1/../admin") == (Verdict.DENY, Reason.PATH_NOT_ALLOWED)

    def test_explanation_names_the_problem(self) -> None:
        """The explanation says the path is ambiguous, not merely outside the prefix."""
        d = decide(snapshot(), Identity("spiffe://cluster.local/ns/shop/sa/cart"),
                   Destination(port=80, protocol=Protocol.HTTP, http_host="api.kadath.io",
                               method="GET", path="/v1/..;/admin"))
        assert "ambiguous" in d.explanation[0].why and "/v1/..;/admin" in d.explanation[0].why
        assert "normalized" in d.message


class TestAllowed:
    @pytest.mark.parametrize("path, normal", [
        ("/v1/x", "/v1/x"),
        ("/v1/", "/v1/"),
        ("/v1/x?q=/../../admin#frag", "/v1/x"),
        ("/v1/%7Euser", "/v1/~user"),
        ("/v1/%41", "/v1/A"),
        ("/v1/a%20b", "/v1/a%20b"),
        ("/v1/a%2db", "/v1/a-b"),
        ("/v1/caf%c3%a9", "/v1/caf%C3%A9"),
        ("/v1/%3f", "/v1/%3F"),
        ("/v1/./x", "/v1/x"),
        ("/v1/a/../b", "/v1/b"),
        ("/v1//x", "/v1/x"),
        ("/v1/a;v=2/x", "/v1/a;v=2/x"),
        ("/v1/file.tar.gz", "/v1/file.tar.gz"),
        ("/v1/...", "/v1/..."),
        ("/v1/%25", "/v1/%25"),
    ])
    def test_normal_paths(self, path: str, normal: str) -> None:
        """Ordinary paths normalize as RFC 3986 says and are allowed under /v1/."""
        assert normalize_path(path) == normal
        assert verdict(path) == (Verdict.ALLOW, Reason.ALLOWED)

    def test_fast_path_is_identity(self) -> None:
        """An already-normal path comes back as the same object (no copy, no cache)."""
        path = "/v1/orders/12345/items"
        assert normalize_path(path) is path


class TestPolicyPrefixes:
    @pytest.mark.parametrize("prefix", ["/v1/..;/", "/v1//x", "/v1/%2e", "/v1/%7E",
                                        "/v1/a b", "/v1/./", "/v1/x?y", "/v1\\x"])
    def test_prefix_must_be_normal(self, prefix: str) -> None:
        """A prefix that is not itself in normal form could never match as written: an
        error that says so."""
        cm = {"metadata": {"name": "p", "namespace": "shop",
                           "labels": {"egress-authz.io/policy": "true"}},
              "data": {"policy.yaml": "rules: [{name: r, hosts: [a.example.com], "
                                      f"http: {{paths: [{prefix!r}]}}}}]"}}
        with pytest.raises(PolicyError) as info:
            parse_configmap(cm, cluster_namespace="egress-authz")
        assert "paths[0]" in info.value.problems[0]


# A lenient upstream: decodes everything (twice), treats '\' as '/', drops ';params',
# merges slashes, resolves dot segments. Whatever we allow under a prefix must stay under
# it for such a reader too.
def lenient(path: str) -> str:
    path = re.split(r"[?#]", path, maxsplit=1)[0]
    path = unquote(unquote(path, errors="replace"), errors="replace").replace("\\", "/")
    segs = [s.split(";", 1)[0] for s in re.sub("/+", "/", path).split("/")[1:]]
    out: list[str] = []
    for s in segs:
        if s == "..":
            if out:
                out.pop()
        elif s != ".":
            out.append(s)
    return "/" + "/".join(out)


PIECES = st.sampled_from([
    "v1", "admin", "x", ".", "..", "", ";", "..;", ".;x", "%2e", "%2E", "%252e", "%2f",
    "%5c", "\\", "%c0%ae", "%41", "%7e", "%", "%2", "a%20b", "?", "#", "%00", "~", "%3b",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=8), st.sampled_from(["/", ""]))
def test_allowed_paths_stay_under_the_prefix_for_a_lenient_reader(
        pieces: list[str], joiner: str) -> None:
    """Property: if a path is allowed under /v1/, a lenient upstream reads it under /v1/
    too; and normalization is idempotent."""
    path = "/v1/" + joiner.join(pieces)
    normal = normalize_path(path)
    if normal is None:
        return
    assert normalize_path(normal) == normal
    if normal.startswith("/v1/"):
        assert (lenient(path) + "/").startswith("/v1/"), (path, normal, lenient(path))


def test_every_always_enforced_reason_has_explain_text() -> None:
    """`egress-authz explain` tells people what to do for each denial no policy lifts,
    path-not-normalized included."""
    from authz.commands.explain import _NOT_A_POLICY_MATTER
    from authz.model import ALWAYS_ENFORCED

    assert {r.value for r in ALWAYS_ENFORCED} <= set(_NOT_A_POLICY_MATTER)


def test_exact_paths_are_judged_on_the_normalized_path() -> None:
    """`exactPaths` use the same normalization: an ambiguous path is path-not-normalized,
    an escaped spelling of the exact path matches it."""
    rule = Rule(name="x", index=0, hosts=("api.kadath.io",), ports=frozenset({80}),
                http=HttpMatch(exact_paths=frozenset({"/v1/~me"})))
    policy = NamespacePolicy(ConfigMapRef("shop", "p"), Tier.NAMESPACE, Mode.ENFORCE, (rule,))
    snap = compile_policy(PolicySet((policy,), revision=1))

    def reason(path: str) -> Reason:
        return decide(snap, Identity("spiffe://cluster.local/ns/shop/sa/cart"),
                      Destination(port=80, protocol=Protocol.HTTP, http_host="api.kadath.io",
                                  method="GET", path=path)).reason

    assert reason("/v1/%7Eme?x=1") is Reason.ALLOWED
    assert reason("/v1/x/..;/~me") is Reason.PATH_NOT_NORMALIZED
    assert reason("/v1/~me/") is Reason.PATH_NOT_ALLOWED
