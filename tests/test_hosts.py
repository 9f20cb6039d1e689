"""Host normalisation and the wildcard dialect (authz.hosts)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz import hosts
from authz.model import Reason


class TestNormalize:
    @pytest.mark.parametrize(
        ("raw", "with_port", "expected"),
        [
            ("api.kadath.io", False, "api.kadath.io"),
            ("API.Kadath.IO", False, "api.kadath.io"),
            ("api.kadath.io.", False, "api.kadath.io"),
            ("api.kadath.io:443", True, "api.kadath.io"),
            ("API.kadath.io.:8443", True, "api.kadath.io"),
            ("bücher.example", False, "xn--bcher-kva.example"),
            ("BÜCHER.example", False, "xn--bcher-kva.example"),
            ("xn--bcher-kva.example", False, "xn--bcher-kva.example"),
            ("a-b.c0.io", False, "a-b.c0.io"),
            ("localhost", False, "localhost"),
        ],
    )
    def test_canonical_forms(self, raw: str, with_port: bool, expected: str) -> None:
        """Case, one trailing dot, a Host port and Unicode all normalise to one name."""
        assert hosts.normalize(raw, with_port=with_port) == expected

    @pytest.mark.parametrize(
        ("raw", "with_port", "reason"),
        [
            ("", False, Reason.INVALID_HOST),
            ("api.kadath.io..", False, Reason.INVALID_HOST),
            ("api..kadath.io", False, Reason.INVALID_HOST),
            ("api.kadath.io@evil.com", True, Reason.INVALID_HOST),
            ("api.kadath.io%2eevil.com", False, Reason.INVALID_HOST),
            ("%2e", False, Reason.INVALID_HOST),
            ("api.kadath.io\x00.evil.com", False, Reason.INVALID_HOST),
            ("api kadath.io", False, Reason.INVALID_HOST),
            ("-api.kadath.io", False, Reason.INVALID_HOST),
            ("api_x.kadath.io", False, Reason.INVALID_HOST),
            ("a" * 64 + ".io", False, Reason.INVALID_HOST),
            (".".join(["abcdefghij"] * 28), False, Reason.INVALID_HOST),  # 307 chars
            ("x" * 300, False, Reason.INVALID_HOST),
            ("api.kadath.io:443", False, Reason.INVALID_HOST),  # no port in an SNI
            ("api.kadath.io:0", True, Reason.INVALID_HOST),
            ("api.kadath.io:99999", True, Reason.INVALID_HOST),
            ("api.kadath.io:https", True, Reason.INVALID_HOST),
            ("1.2.3.4", False, Reason.IP_LITERAL),
            ("1.2.3.4:443", True, Reason.IP_LITERAL),
            ("127.1", False, Reason.IP_LITERAL),
            ("2130706433", False, Reason.IP_LITERAL),
            ("::1", False, Reason.IP_LITERAL),
            ("[::1]", True, Reason.IP_LITERAL),
            ("[::1]:443", True, Reason.IP_LITERAL),
            ("[fe80::1%eth0]:443", True, Reason.IP_LITERAL),
            ("[not-an-ip]:443", True, Reason.INVALID_HOST),
            ("\u200b.example", False, Reason.INVALID_HOST),
        ],
    )
    def test_hostile_inputs_are_denied_with_a_reason(
        self, raw: str, with_port: bool, reason: Reason
    ) -> None:
        """Names that are not DNS names never reach matching."""
        with pytest.raises(hosts.HostError) as info:
            hosts.normalize(raw, with_port=with_port)
        assert info.value.reason is reason

    def test_giant_input_is_not_cached(self) -> None:
        """A megabyte of host is refused before it can fill the cache."""
        name, port, reason, _ = hosts.normalize_or_reason("a" * 1_000_000)
        assert (name, port, reason) == ("", None, Reason.INVALID_HOST)

    @given(st.text(max_size=300))
    def test_never_raises_anything_but_host_error(self, raw: str) -> None:
        """Any text either normalises to a valid name or gives a reason."""
        for with_port in (False, True):
            name, _, reason, message = hosts.normalize_or_reason(raw, with_port=with_port)
            if reason is None:
                assert name and len(name) <= 253 and name == name.lower()
                assert name.isascii() and all(c.isalnum() or c in ".-" for c in name)
            else:
                assert reason in (Reason.INVALID_HOST, Reason.IP_LITERAL) and message

    @given(st.from_regex(r"[a-z][a-z0-9]{0,10}(\.[a-z][a-z0-9]{0,10}){1,4}", fullmatch=True))
    def test_idempotent(self, name: str) -> None:
        """Normalising a normal name changes nothing; case and a trailing dot are noise."""
        assert hosts.normalize(name) == name
        assert hosts.normalize(name.upper() + ".") == name


class TestPatterns:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [("api.kadath.io", "api.kadath.io"), ("*.Kadath.IO", "*.kadath.io"), ("*.io", "*.io")],
    )
    def test_valid(self, raw: str, expected: str) -> None:
        """Exact names and a leftmost '*' label are the whole dialect."""
        assert hosts.parse_pattern(raw) == expected

    @pytest.mark.parametrize(
        ("raw", "fragment"),
        [
            ("*", "bare '*'"),
            ("*.*.io", "whole leftmost label"),
            ("*kadath.io", "whole leftmost label"),
            ("api.*.io", "whole leftmost label"),
            ("a*.kadath.io", "whole leftmost label"),
            ("https://api.kadath.io", "name only"),
            ("api.kadath.io:443", "name only"),
            ("1.2.3.4", "IP addresses"),
            ("*.1.2.3.4", "IP addresses"),
            ("api..io", "empty label"),
        ],
    )
    def test_invalid(self, raw: str, fragment: str) -> None:
        """Every other use of '*' and anything not a name is refused, saying why."""
        with pytest.raises(hosts.PatternError, match=fragment):
            hosts.parse_pattern(raw)

    def test_bare_star_only_where_allowed(self) -> None:
        """The cluster deny list may name '*'; rules never."""
        assert hosts.parse_pattern("*", allow_any=True) == "*"


class TestMatching:
    @pytest.mark.parametrize(
        ("pattern", "name", "expected"),
        [
            ("*.kadath.io", "api.kadath.io", True),
            ("*.kadath.io", "a.b.kadath.io", True),
            ("*.kadath.io", "kadath.io", False),
            ("*.kadath.io", "evilkadath.io", False),
            ("*.kadath.io", "api.kadath.io.evil.com", False),
            ("api.kadath.io", "api.kadath.io", True),
            ("api.kadath.io", "x.api.kadath.io", False),
            ("api.kadath.io", "api.kadath.io.evil.com", False),
        ],
    )
    def test_table(self, pattern: str, name: str, expected: bool) -> None:
        """Leftmost '*' matches any depth below the apex, never the apex itself."""
        assert hosts.matches(pattern, name) is expected

    def test_parent_suffixes(self) -> None:
        """The index walk visits every parent, most specific first."""
        assert hosts.parent_suffixes("a.b.kadath.io") == ("b.kadath.io", "kadath.io", "io")
        assert hosts.parent_suffixes("io") == ()

    @given(
        st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=1, max_size=5),
        st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), min_size=0, max_size=3),
    )
    def test_wildcard_equals_suffix_walk(self, apex: list[str], below: list[str]) -> None:
        """matches('*.X', n) holds exactly when X is a parent suffix of n (the engine's index)."""
        x = ".".join(apex)
        name = ".".join([*below, x])
        assert hosts.matches("*." + x, name) == (x in hosts.parent_suffixes(name))
        assert hosts.matches("*." + x, name) == bool(below)
