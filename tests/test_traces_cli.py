"""`traces`, `explain` and `suggest` against a running `serve` fed with real Checks.

The service runs in-process (serve() in a thread) with the example policies,
a workloads file and an admin endpoint on a free port; Checks go over gRPC
like Envoy's, so the decisions, explanations and records are the real ones.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from authz.cli import build_parser, main
from authz.commands import traces
from authz.commands.serve import build_arg_parser, serve
from authz.commands.suggest import suggest_configmap
from authz.engine import compile_policy, decide
from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest, CheckResponse
from authz.envoy.server import CHECK_METHOD
from authz.loader import LoadResult, build_policy_set, load_objects, load_path
from authz.model import Destination, Identity, Protocol, Workload

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)

PODS = """\
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata: {name: cart-7d9f, namespace: shop, labels: {app: cart, function: api-connector}}
    spec: {serviceAccountName: cart}
    status: {phase: Running, podIP: 127.0.0.2}
  - apiVersion: v1
    kind: Pod
    metadata: {name: analytics-1, namespace: marketing, labels: {app: analytics}}
    spec: {serviceAccountName: analytics}
    status: {phase: Running, podIP: 127.0.0.3}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_request(
    *,
    principal: str,
    source_ip: str,
    sni: str | None = None,
    host: str | None = None,
    port: int = 443,
    method: str = "GET",
    path: str = "/",
    traceparent: str | None = None,
) -> bytes:
    r = CheckRequest()
    a = r.attributes
    a.source.principal = principal
    a.source.address.socket_address.address = source_ip
    a.destination.address.socket_address.port_value = port
    if sni:
        a.tls_session.sni = sni
    if host:
        a.request.http.host = host
        a.request.http.method = method
        a.request.http.path = path
        if traceparent:
            a.request.http.headers["traceparent"] = traceparent
    data: bytes = r.SerializeToString()
    return data


CART = {"principal": "spiffe://cluster.local/ns/shop/sa/cart", "source_ip": "127.0.0.2"}
ANALYTICS = {
    "principal": "spiffe://cluster.local/ns/marketing/sa/analytics",
    "source_ip": "127.0.0.3",
}


@dataclass
class Service:
    grpc_port: int
    admin_url: str
    channel: grpc.Channel
    policies: Path

    def check(self, **kw: Any) -> str:
        """Send one Check; return the decision id from the dynamic metadata."""
        raw = self.channel.unary_unary(CHECK_METHOD)(check_request(**kw), timeout=5)
        fields = CheckResponse.FromString(raw).dynamic_metadata.fields
        return str(fields["decision_id"].string_value)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("svc")
    policies = tmp / "policies"
    shutil.copytree(ROOT / "examples", policies)
    (tmp / "pods.yaml").write_text(PODS)
    grpc_port, admin_port = free_port(), free_port()
    args = build_arg_parser().parse_args(
        [
            "--policies", str(policies),
            "--workloads", str(tmp / "pods.yaml"),
            "--grpc-address", f"127.0.0.1:{grpc_port}",
            "--admin-address", f"127.0.0.1:{admin_port}",
            "--no-decision-log",
        ]
    )  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(args, stop), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{admin_port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "serve did not become ready"
        time.sleep(0.05)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield Service(grpc_port, url, channel, policies)
    channel.close()
    stop.set()
    thread.join(15)


@pytest.fixture(scope="module")
def traffic(service: Service) -> dict[str, str]:
    """One of each: allow, host denial, port denial, cluster deny, audit (HTTP)."""
    ids = {
        "allow": service.check(sni="api.kadath.io", **CART),
        "deny": service.check(sni="api.leng.com", **CART),
        "port": service.check(sni="api.kadath.io", port=8443, **CART),
        "cluster": service.check(sni="api.stealyourmoney.com", **CART),
        "audit": service.check(host="hooks.kadath.io", port=80, path="/v2/x", **ANALYTICS),
        "other": service.check(sni="status.kadath.io", **CART),
    }
    time.sleep(0.2)  # the ring is filled at once; give the SSE fan-out thread a beat
    return ids


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class TestTraces:
    def test_table(self, service: Service, traffic: dict[str, str], capsys: Any) -> None:
        """The default output is a table, oldest first, with the documented columns."""
        code, out, _ = cli(capsys, "traces", "--server", service.admin_url, "-n", "shop")
        assert code == 0
        lines = out.splitlines()
        assert lines[0].split() == list(traces.COLUMNS)
        assert len(lines) == 1 + 5
        deny = next(line for line in lines if "api.leng.com:443" in line)
        assert "shop/cart" in deny and "deny" in deny and "host-not-allowed" in deny
        assert "µs" in deny or "ms" in deny
        allow = next(line for line in lines if "api.kadath.io:443" in line)
        assert "shop/egress-policy/kadath-api" in allow

    @pytest.mark.parametrize(
        "flags, expected",
        [
            (["--verdict", "deny", "-n", "shop"], {"deny", "port", "cluster", "other"}),
            (["--verdict", "audit"], {"audit"}),
            (["--host", "*.kadath.io", "-n", "shop"], {"allow", "port", "other"}),
            (["--reason", "cluster-denied"], {"cluster"}),
            (["--workload", "marketing/analytics"], {"audit"}),
        ],
    )
    def test_filters_json(
        self,
        service: Service,
        traffic: dict[str, str],
        capsys: Any,
        flags: list[str],
        expected: set[str],
    ) -> None:
        """Filters reach the server; --output json gives the decision records."""
        code, out, _ = cli(capsys, "traces", "--server", service.admin_url, "-o", "json", *flags)
        assert code == 0
        by_id = {v: k for k, v in traffic.items()}
        got = {by_id[d["decision_id"]] for d in json.loads(out) if d["decision_id"] in by_id}
        assert got == expected

    def test_follow(self, service: Service, traffic: dict[str, str]) -> None:
        """--follow prints decisions as they happen (SSE), here stopping after --limit."""
        args = build_parser().parse_args(
            ["traces", "--server", service.admin_url, "--follow", "--verdict", "deny",
             "--limit", "2", "-o", "json"]
        )  # fmt: skip
        out = io.StringIO()
        result: dict[str, int] = {}
        t = threading.Thread(target=lambda: result.update(code=traces.run(args, out)))
        t.start()
        time.sleep(0.5)  # let the stream open
        service.check(sni="api.kadath.io", **CART)  # allow: filtered out
        first = service.check(sni="follow-1.example.com", **CART)
        second = service.check(sni="follow-2.example.com", **CART)
        t.join(10)
        assert not t.is_alive() and result["code"] == 0
        got = [json.loads(line)["decision_id"] for line in out.getvalue().splitlines()]
        assert got == [first, second]

    def test_unreachable(self, capsys: Any) -> None:
        """A server that is not there gives a clear error and exit code 1."""
        port = free_port()
        code, _, err = cli(capsys, "traces", "--server", f"127.0.0.1:{port}")
        assert code == 1
        assert f"cannot reach the egress-authz admin endpoint at http://127.0.0.1:{port}" in err
        assert "--admin-address" in err

    def test_nothing_matches(self, service: Service, traffic: dict[str, str], capsys: Any) -> None:
        """No match prints a note on stderr, nothing on stdout, exit 0."""
        code, out, err = cli(capsys, "traces", "--server", service.admin_url, "-n", "nobody")
        assert (code, out) == (0, "") and "no recorded decisions" in err


class TestExplain:
    def test_denial(self, service: Service, traffic: dict[str, str], capsys: Any) -> None:
        """explain shows identity and destination as seen, each rule and why, and what to edit."""
        code, out, _ = cli(capsys, "explain", traffic["deny"], "--server", service.admin_url)
        assert code == 0
        assert f"Decision {traffic['deny']}" in out
        assert "DENY (host-not-allowed)" in out
        assert "spiffe://cluster.local/ns/shop/sa/cart" in out
        assert "cart-7d9f (127.0.0.2)" in out
        assert "function=api-connector" in out
        assert "api.leng.com" in out and "TLS (network filter)" in out
        assert "Rules considered" in out
        assert "shop/egress-policy/leng-payments" in out  # the rule naming the host, and why not
        assert "kubectl -n shop edit configmap egress-policy" in out
        assert "hosts: [api.leng.com]" in out  # a rule that would allow it

    def test_port(self, service: Service, traffic: dict[str, str], capsys: Any) -> None:
        """A port denial points at the rule and the port to add."""
        _, out, _ = cli(capsys, "explain", traffic["port"], "--server", service.admin_url)
        assert "port-not-allowed" in out and "Add port 8443 to ports of rule kadath-api" in out

    def test_cluster_deny(self, service: Service, traffic: dict[str, str], capsys: Any) -> None:
        """A cluster deny is explained as out of the namespace's hands."""
        _, out, _ = cli(capsys, "explain", traffic["cluster"], "--server", service.admin_url)
        assert "cluster-denied" in out and "a namespace policy cannot lift that" in out
        assert "egress-authz/egress-cluster-policy" in out

    def test_audit(self, service: Service, traffic: dict[str, str], capsys: Any) -> None:
        """An audit verdict says the request went through and would be denied in enforce."""
        _, out, _ = cli(capsys, "explain", traffic["audit"], "--server", service.admin_url)
        assert "AUDIT (path-not-allowed)" in out and "Audit mode" in out
        assert "GET /v2/x" in out

    def test_allow(self, service: Service, traffic: dict[str, str], capsys: Any) -> None:
        """An allow names the rule that allowed it."""
        _, out, _ = cli(capsys, "explain", traffic["allow"], "--server", service.admin_url)
        assert "Allowed by rule shop/egress-policy/kadath-api (owner: team-integrations)" in out

    def test_unknown(self, service: Service, capsys: Any) -> None:
        """An id the server does not hold: exit 1 and why it may be missing."""
        code, _, err = cli(capsys, "explain", "0123456789abcdef", "--server", service.admin_url)
        assert code == 1 and "not in the buffer" in err


def _suggested_policies(text: str) -> LoadResult:
    result = LoadResult()
    load_objects(yaml.safe_load_all(text), "suggestion", result, cluster_namespace="egress-authz")
    return result


class TestSuggest:
    def test_suggestion_allows_what_was_denied(
        self, service: Service, traffic: dict[str, str], capsys: Any
    ) -> None:
        """The printed ConfigMap is a valid policy, and with it the denied requests pass,
        while the cluster deny stays denied (and is only mentioned in a comment)."""
        code, out, _ = cli(capsys, "suggest", "--namespace", "shop", "--server", service.admin_url)
        assert code == 0
        suggestion = _suggested_policies(out)
        assert suggestion.problems == [] and len(suggestion.policies) == 1
        assert "# Left out, no namespace policy can allow it: 1 x cluster-denied" in out
        assert "Existing policy: shop/egress-policy" in out
        assert "labels on every Pod seen" in out and "function=api-connector" in out

        existing = load_path(service.policies)
        snapshot = compile_policy(build_policy_set(existing.policies + suggestion.policies))
        cart = Identity(
            CART["principal"],
            "127.0.0.2",
            Workload("shop", "cart", {"app": "cart", "function": "api-connector"}, "cart-7d9f"),
        )
        for host, port in (
            ("api.leng.com", 443),
            ("api.kadath.io", 8443),
            ("status.kadath.io", 443),
        ):
            d = decide(snapshot, cart, Destination(port, Protocol.TLS, sni=host))
            assert d.allowed, (host, port, d.reason)
        d = decide(snapshot, cart, Destination(443, Protocol.TLS, sni="api.stealyourmoney.com"))
        assert not d.allowed

    def test_audit_namespace(self, service: Service, traffic: dict[str, str], capsys: Any) -> None:
        """For a namespace in audit mode the suggestion stays in audit mode."""
        _, out, _ = cli(capsys, "suggest", "-n", "marketing", "--server", service.admin_url)
        policy = yaml.safe_load(yaml.safe_load(out)["data"]["policy.yaml"])
        assert policy["mode"] == "audit"
        assert policy["rules"][0]["hosts"] == ["hooks.kadath.io"]
        assert policy["rules"][0]["protocols"] == ["HTTP"] and policy["rules"][0]["ports"] == [80]
        # only what was seen: the method and the path, not every path of the host
        assert policy["rules"][0]["http"] == {"methods": ["GET"], "exactPaths": ["/v2/x"]}
        assert _suggested_policies(out).problems == []

    def test_nothing_to_suggest(
        self, service: Service, traffic: dict[str, str], capsys: Any
    ) -> None:
        """A namespace with no denials gets a note, not an empty ConfigMap."""
        code, out, err = cli(capsys, "suggest", "-n", "quiet", "--server", service.admin_url)
        assert (code, out) == (0, "") and "nothing to suggest" in err


class TestSuggestWildcards:
    DECISIONS: list[dict[str, Any]] = [
        {"reason": "host-not-allowed", "host": h, "port": 443, "protocol": "TLS",
         "service_account": "cart", "mode": "enforce", "labels": {}}
        for h in ("a.kadath.io", "b.kadath.io", "api.leng.com", "x.co.uk", "y.co.uk")
    ]  # fmt: skip

    def _hosts(self, text: str) -> list[str]:
        policy = yaml.safe_load(yaml.safe_load(text)["data"]["policy.yaml"])
        hosts: list[str] = policy["rules"][0]["hosts"]
        return hosts

    def test_exact_by_default(self) -> None:
        """Without --wildcards every observed host is listed exactly."""
        text = suggest_configmap(self.DECISIONS, "shop", name="s")
        assert self._hosts(text) == [
            "a.kadath.io",
            "api.leng.com",
            "b.kadath.io",
            "x.co.uk",
            "y.co.uk",
        ]

    def test_wildcards_for_siblings_only(self) -> None:
        """--wildcards folds siblings under one organisation's domain, never a public suffix."""
        text = suggest_configmap(self.DECISIONS, "shop", name="s", wildcards=True)
        assert self._hosts(text) == ["api.leng.com", "x.co.uk", "y.co.uk", "*.kadath.io"]
        assert _suggested_policies(text).problems == []


class TestExplainRender:
    def test_unparsed_request(self) -> None:
        """A bad request (no identity, no destination) explains without a rule to edit."""
        from authz.commands.explain import render
        from authz.model import Decision, Reason, Verdict
        from authz.observe.decisionlog import record_detail
        from authz.records import DecisionRecord

        d = Decision(False, Verdict.DENY, Reason.BAD_REQUEST, "bad1", 3, message="truncated")
        text = render(record_detail(DecisionRecord(d, None, None, time.time_ns(), 1000)))
        assert "DENY (bad-request)" in text and "truncated" in text
        assert "ext_authz configuration" in text and "kubectl" not in text

    def test_untrusted_identity(self) -> None:
        """An identity outside the trust domain is explained as a mesh problem."""
        from authz.commands.explain import render
        from authz.model import Decision, Reason, Verdict
        from authz.observe.decisionlog import record_detail
        from authz.records import DecisionRecord

        d = Decision(False, Verdict.DENY, Reason.UNTRUSTED_IDENTITY, "u1", 3)
        ident = Identity("spiffe://evil.example/ns/x/sa/y", "10.1.1.1")
        rec = DecisionRecord(d, ident, Destination(443, Protocol.TLS, sni="a.io"), 1, 1)
        text = render(record_detail(rec))
        assert "spiffe://evil.example/ns/x/sa/y" in text and "none known for 10.1.1.1" in text
        assert "trust domain" in text
