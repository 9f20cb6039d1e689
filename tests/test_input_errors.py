"""Small hostile inputs that used to slip through: each now gets a clear error (issue 10, 9)."""

from __future__ import annotations

import io
import json
import math
import urllib.request
from pathlib import Path

import pytest

from authz import hosts
from authz.loader import load_path
from authz.model import Reason, Verdict
from authz.observe.admin import AdminServer
from authz.observe.query import DecisionQuery, QueryError, parse_since
from authz.observe.recorder import DecisionRecorder, TracingSettings
from tests.test_ip_spellings import audit_verdict


class TestDuplicateOuterKey:
    def test_policy_yaml_key_twice_in_a_file(self, tmp_path: Path) -> None:
        """A ConfigMap file with two `policy.yaml:` keys is an error naming the line; the
        second (which used to win silently) is not loaded."""
        path = tmp_path / "p.yaml"
        path.write_text(
            "apiVersion: v1\nkind: ConfigMap\n"
            "metadata: {name: p, namespace: shop, labels: {egress-authz.io/policy: 'true'}}\n"
            "data:\n"
            "  policy.yaml: |\n    rules: [{name: a, hosts: [a.example]}]\n"
            "  policy.yaml: |\n    rules: [{name: b, hosts: [b.example]}]\n")
        result = load_path(path)
        assert result.policies == []
        (problem,) = result.problems
        assert "'policy.yaml' is given twice" in problem and f"{path}:7:" in problem

    def test_metadata_key_twice(self, tmp_path: Path) -> None:
        """Any duplicated key in a manifest counts, not only inside policy.yaml."""
        path = tmp_path / "p.yaml"
        path.write_text("kind: ConfigMap\nmetadata: {name: a}\nmetadata: {name: b}\n")
        assert "given twice" in load_path(path).problems[0]


class TestSinceOverflow:
    @pytest.mark.parametrize("text", ["9" * 400 + "d", "9" * 400 + "ms", "1e999d",
                                      "9" * 20 + "d"])
    def test_absurd_durations_do_not_raise(self, text: str) -> None:
        """A duration longer than the epoch is 'everything' (since 0), not OverflowError;
        a malformed one is a QueryError (400)."""
        try:
            assert parse_since(text, now=1_000_000.0) == 0
        except QueryError:
            assert "e" in text  # only the malformed spelling may be refused

    def test_over_http_is_an_answer(self) -> None:
        """The issue's request: `?since=<400 nines>d` gets an HTTP answer, and the admin
        server keeps serving (it used to drop the connection)."""
        recorder = DecisionRecorder(TracingSettings(ring_size=10, flush_interval=0.01),
                                    log_stream=io.StringIO())
        recorder.start()
        server = AdminServer("127.0.0.1:0", recorder, lambda: True, heartbeat=0.2).start()
        try:
            url = server.url + "/v1/decisions?since=" + "9" * 400 + "d"
            with urllib.request.urlopen(url, timeout=5) as resp:
                assert resp.status == 200
                assert json.loads(resp.read())["decisions"] == []
            with urllib.request.urlopen(server.url + "/healthz", timeout=5) as resp:
                assert resp.status == 200
        finally:
            server.stop()
            recorder.close()

    def test_query_keeps_finite_bound(self) -> None:
        """The parsed bound is a finite integer."""
        q = DecisionQuery.from_params({"since": ["9" * 400 + "d"]})
        assert q.since_unix_ns == 0 and math.isfinite(q.since_unix_ns)


BAD_A_LABELS = ["xn--zz.example", "xn--a.example", "api.xn--abc.io",
                "xn--ls8h.la", "XN--ZZ.example", "xn--bcher-kvb.example"]


class TestALabels:
    @pytest.mark.parametrize("name", BAD_A_LABELS)
    def test_request_invalid_host(self, name: str) -> None:
        """An `xn--` label that is not valid punycode of a valid IDNA name is invalid-host
        as SNI or Host, and audit mode does not lift it."""
        _, _, reason, message = hosts.normalize_or_reason(name)
        assert reason is Reason.INVALID_HOST and "A-label" in message
        assert audit_verdict(sni=name) == (Verdict.DENY, Reason.INVALID_HOST)

    @pytest.mark.parametrize("name", BAD_A_LABELS)
    def test_policy_refuses(self, name: str) -> None:
        """A policy naming one is refused at parse, plain or as a wildcard suffix."""
        with pytest.raises(hosts.PatternError, match="A-label"):
            hosts.parse_pattern(name)
        with pytest.raises(hosts.PatternError, match="A-label"):
            hosts.parse_pattern("*.sub." + name)

    @pytest.mark.parametrize("name, canonical", [
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("xn--mnchen-3ya.de", "xn--mnchen-3ya.de"),
    ])
    def test_valid_a_labels_pass(self, name: str, canonical: str) -> None:
        """Valid A-labels, in any case, and their Unicode forms name the same host."""
        assert hosts.normalize(name) == canonical
        assert hosts.parse_pattern(name) == canonical

