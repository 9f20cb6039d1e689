"""Which port is judged: the connection's (gateway listener -> Service port), never Host's.

Issue 10 item 4 (a Host port that differs from the connection's is `port-mismatch`) and
issue 11 item 2 (the gateway listener port is translated back to the port the app dialled).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import pytest

from authz.engine import compile_policy, decide
from authz.loader import build_policy_set
from authz.model import ALWAYS_ENFORCED, Destination, Identity, Protocol, Reason, Verdict, Workload
from authz.policy import parse_configmap


def cm(body: str, namespace: str = "shop") -> dict[str, Any]:
    return {
        "kind": "ConfigMap",
        "metadata": {"name": "egress-policy", "namespace": namespace,
                     "labels": {"egress-authz.io/policy": "true"}},
        "data": {"policy.yaml": body},
    }


POLICY = """
mode: {mode}
rules:
  - name: tls-only
    hosts: [api.kadath.io]
    ports: [443]
  - name: web
    hosts: [web.kadath.io]
    ports: [80]
"""


def snapshot(mode: str = "enforce"):
    policy = parse_configmap(cm(POLICY.format(mode=mode)), cluster_namespace="egress-authz")
    return compile_policy(build_policy_set([policy], revision=1))


CART = Identity(
    "spiffe://cluster.local/ns/shop/sa/cart", "10.0.0.9",
    Workload("shop", "cart", MappingProxyType({}), "cart-1", "10.0.0.9"),
)


def http(host: str, port: int, sni: str | None = None) -> Destination:
    return Destination(port, Protocol.HTTP, sni=sni, http_host=host, method="GET", path="/")


class TestHostPortCannotChooseThePort:
    """Issue 10.4: the Host header's port never overrides the connection's port."""

    def test_host_443_on_the_plain_http_listener_is_denied(self) -> None:
        """The attack: cleartext on port 80 with `Host: api.kadath.io:443` must not pass
        a rule that allows api.kadath.io on 443 only."""
        d = decide(snapshot(), CART, http("api.kadath.io:443", 80))
        assert (d.allowed, d.verdict, d.reason) == (False, Verdict.DENY, Reason.PORT_MISMATCH)
        assert "443" in d.message and "80" in d.message

    def test_mismatch_is_enforced_in_audit_mode(self) -> None:
        """Audit mode does not lift port-mismatch: it is about the request, not the policy."""
        assert Reason.PORT_MISMATCH in ALWAYS_ENFORCED
        d = decide(snapshot("audit"), CART, http("api.kadath.io:443", 80))
        assert (d.allowed, d.verdict, d.reason) == (False, Verdict.DENY, Reason.PORT_MISMATCH)

    def test_host_without_port_is_judged_on_the_connection_port(self) -> None:
        """No port in Host: the connection's port decides (80 is not allowed for api)."""
        d = decide(snapshot(), CART, http("api.kadath.io", 80))
        assert (d.allowed, d.reason) == (False, Reason.PORT_NOT_ALLOWED)
        assert decide(snapshot(), CART, http("web.kadath.io", 80)).allowed

    @pytest.mark.parametrize("host", ["web.kadath.io:80", "WEB.kadath.io:80", "web.kadath.io.:80"])
    def test_host_naming_the_connection_port_is_fine(self, host: str) -> None:
        """`Host: x:80` on port 80 is the default port spelt out: allowed."""
        assert decide(snapshot(), CART, http(host, 80)).allowed

    def test_host_port_lower_than_connection_is_a_mismatch_too(self) -> None:
        """The other direction: `Host: web.kadath.io:80` on a 443 connection is denied,
        not judged as 80."""
        d = decide(snapshot(), CART, http("web.kadath.io:80", 443, sni="web.kadath.io"))
        assert d.reason is Reason.PORT_MISMATCH

    def test_tls_host_with_its_own_port(self) -> None:
        """HTTP over TLS on 443 with `Host: api.kadath.io:443` and the same SNI is allowed."""
        d = decide(snapshot(), CART, http("api.kadath.io:443", 443, sni="api.kadath.io"))
        assert d.allowed

    def test_reason_is_documented_and_explained(self) -> None:
        """port-mismatch is in the README's reason table and `explain` says what to change."""
        from pathlib import Path

        from authz.commands.explain import render

        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
        assert "| `port-mismatch` | deny |" in readme
        d = decide(snapshot(), CART, http("api.kadath.io:443", 80))
        text = render({"decision_id": d.decision_id, "verdict": d.verdict.value,
                       "reason": d.reason.value, "message": d.message})
        assert "names a port other than the one the connection" in text
        assert "kubectl" not in text  # not a policy matter: no ConfigMap to edit


class TestPortMapFlag:
    """`--gateway-port-map LISTEN:PORT,...`: parsed strictly, errors say what is wrong."""

    def test_parses_pairs(self) -> None:
        """The istioctl egress values (443->8443, 80->8080) as a map, spaces tolerated."""
        from authz.gateway_ports import format_port_map, parse_port_map

        assert parse_port_map("8443:443, 8080:80") == {8443: 443, 8080: 80}
        assert format_port_map({8443: 443, 8080: 80}) == "8080:80,8443:443"

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "empty"),
            ("8443", "is not LISTEN:PORT"),
            ("8443:443:1", "is not LISTEN:PORT"),
            ("8443:https", "port 'https' is not a port number"),
            ("x:443", "listener port 'x' is not a port number"),
            ("8443:0", "port 0 is out of range"),
            ("70000:443", "listener port 70000 is out of range"),
            ("8443:443,8443:8443", "listener port 8443 is mapped twice"),
            ("8443:443,", "'' is not LISTEN:PORT"),
            ("9" * 5000 + ":443", "out of range"),  # never int() of an unbounded string
            ("x" * 5000, r"'xxxxxxxxxxxxxxxxxxx\.\.\. is not LISTEN:PORT"),  # echoed clipped
            ("\uff18\uff14\uff14\uff13:443", "is not a port number"),  # fullwidth: isdigit()
        ],
    )
    def test_malformed_maps_are_refused(self, text: str, message: str) -> None:
        """Each malformed map is a PortMapError naming the fault."""
        from authz.gateway_ports import PortMapError, parse_port_map

        with pytest.raises(PortMapError, match=message.replace("(", r"\(")):
            parse_port_map(text)

    def test_serve_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`serve --gateway-port-map 8443` exits 2 with the flag and the fault on stderr."""
        from authz.commands.serve import build_arg_parser

        with pytest.raises(SystemExit) as exc:
            build_arg_parser().parse_args(["--gateway-port-map", "8443"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "argument --gateway-port-map" in err and "is not LISTEN:PORT" in err

    def test_workers_get_the_same_map(self) -> None:
        """The --workers supervisor hands the (normalised) map on to every worker."""
        from authz.commands.serve import build_arg_parser, child_argv

        args = build_arg_parser().parse_args(
            ["--policies", "p", "--workers", "2", "--gateway-port-map", "8443:443,8080:80"])
        argv = child_argv(args)(1, 5, -1)
        assert argv[argv.index("--gateway-port-map") + 1] == "8080:80,8443:443"

    def test_which_map_serve_builds(self) -> None:
        """Flag: that map; --kube without it: empty until the Service is read (deny);
        file mode without it: none (listener ports judged as is)."""
        from authz.commands.serve import build_arg_parser, build_gateway_ports

        parse = build_arg_parser().parse_args
        assert build_gateway_ports(parse(["--gateway-port-map", "8443:443"])).translate(8443) == 443
        assert build_gateway_ports(parse(["--kube"])).translate(443) == 0
        assert build_gateway_ports(parse([])).translate(8443) == 8443


def service(*ports: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "istio-egressgateway", "namespace": "istio-egress"},
            "spec": {"ports": list(ports)}}


class TestMapFromService:
    """The map `serve --kube` learns from the gateway's Service: targetPort -> port."""

    def test_istioctl_egress_values(self) -> None:
        """Service 443 -> targetPort 8443, 80 -> 8080 (istioctl's istio-egress values)."""
        from authz.gateway_ports import map_from_service

        found = map_from_service(service(
            {"name": "http2", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"},
        ))
        assert dict(found.mapping) == {8080: 80, 8443: 443} and not found.problems

    def test_defaults_and_strings(self) -> None:
        """No targetPort means the port itself; a numeric string is a number; UDP is skipped."""
        from authz.gateway_ports import map_from_service

        found = map_from_service(service(
            {"port": 443}, {"port": 80, "targetPort": "8080"},
            {"port": 53, "targetPort": 5353, "protocol": "UDP"},
        ))
        assert dict(found.mapping) == {443: 443, 8080: 80}

    def test_named_target_port_is_unmapped_and_reported(self) -> None:
        """A named targetPort cannot be resolved from the Service: left out, said why."""
        from authz.gateway_ports import map_from_service

        found = map_from_service(service({"port": 443, "targetPort": "https"},
                                         {"port": 80, "targetPort": 8080}))
        assert dict(found.mapping) == {8080: 80}
        assert "named targetPort 'https'" in found.problems[0]

    def test_ambiguous_listener_is_unmapped(self) -> None:
        """Two Service ports onto one listener: the dialled port is unknown, so unmapped."""
        from authz.gateway_ports import map_from_service

        found = map_from_service(service({"port": 443, "targetPort": 8443},
                                         {"port": 8443, "targetPort": 8443},
                                         {"port": 80, "targetPort": 8080}))
        assert dict(found.mapping) == {8080: 80}
        assert "listener port 8443" in found.problems[0]

    @pytest.mark.parametrize("spec", [None, {}, {"ports": "443"}, {"ports": [None, 7]}])
    def test_hostile_shapes_give_an_empty_map(self, spec: Any) -> None:
        """Whatever shape the Service has, the result is a map, never an exception."""
        from authz.gateway_ports import map_from_service

        assert dict(map_from_service({"spec": spec}).mapping) == {}

    @pytest.mark.parametrize("bad", [0, 70000, True, "x" * 100, -1, 4.5, "9" * 5000, [1] * 9])
    def test_bad_numbers_are_reported(self, bad: Any) -> None:
        """Out-of-range, boolean or non-integer ports and targetPorts never enter the map."""
        from authz.gateway_ports import map_from_service

        for p in ({"port": bad}, {"port": 443, "targetPort": bad}):
            found = map_from_service(service(p))
            assert dict(found.mapping) == {} and found.problems


def check_request(listener: int, *, host: str | None = None) -> bytes:
    """shop/cart (10.0.0.9) to api.kadath.io through gateway listener `listener`;
    with `host`, as the HTTP filter sends it. Also used by test_kube_ports."""
    from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest

    r = CheckRequest()
    a = r.attributes
    a.source.principal = "spiffe://cluster.local/ns/shop/sa/cart"
    a.source.address.socket_address.address = "10.0.0.9"
    a.destination.address.socket_address.address = "10.9.9.9"
    a.destination.address.socket_address.port_value = listener
    a.tls_session.sni = "api.kadath.io"
    if host is not None:
        http_ = a.request.http
        http_.host, http_.method, http_.path, http_.scheme = host, "GET", "/", "https"
    return r.SerializeToString()


class TestTranslation:
    """The listener port in the CheckRequest becomes the port the app dialled."""

    def parse(self, listener: int, mapping: dict[int, int] | None, **kw: Any) -> Destination:
        from authz.envoy.request import ParsedCheck, parse_check_request
        from authz.gateway_ports import GatewayPorts

        parsed = parse_check_request(check_request(listener, **kw), None,
                                     GatewayPorts(mapping).translate)
        assert isinstance(parsed, ParsedCheck), parsed
        return parsed.destination

    def test_mapped_unmapped_and_no_map(self) -> None:
        """8443 -> 443 with the map; an unknown listener port -> 0; no map -> as is."""
        d = self.parse(8443, {8443: 443})
        assert (d.port, d.listener_port) == (443, 8443)
        assert self.parse(15443, {8443: 443}).port == 0
        assert self.parse(8443, None).port == 8443

    def test_unmapped_http_does_not_fall_back_on_the_scheme(self) -> None:
        """An unknown listener port stays 0 under the HTTP filter too (no 'https' -> 443)."""
        d = self.parse(15443, {8443: 443}, host="api.kadath.io")
        assert (d.port, d.listener_port) == (0, 15443)

    def test_decisions_through_the_check_service(self) -> None:
        """CheckService with the map: a 443 rule allows a Check from listener 8443, and an
        unmapped listener port is denied with a message naming it."""
        from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckResponse
        from authz.envoy.server import CheckService
        from authz.gateway_ports import GatewayPorts
        from authz.store import PolicyStore

        store = PolicyStore(freeze_gc=False)
        store.publish(snapshot().policy_set)
        service_ = CheckService(store, ports=GatewayPorts({8443: 443, 8080: 80}))
        without = CheckService(store)

        def code(svc: CheckService, listener: int, **kw: Any) -> int:
            resp = CheckResponse()
            resp.ParseFromString(svc.check(check_request(listener, **kw)))
            return resp.status.code

        assert code(service_, 8443) == 0
        assert code(without, 8443) == 7  # the old behaviour: every TLS Check denied
        assert code(service_, 8444) == 7
        assert code(service_, 8080, host="api.kadath.io:443") == 7  # port-mismatch

    def test_unmapped_explanation(self) -> None:
        """The denial for an unmapped listener port says it is the port map's doing."""
        dest = Destination(0, Protocol.TLS, sni="api.kadath.io", listener_port=15443)
        d = decide(snapshot(), CART, dest)
        assert d.reason is Reason.PORT_NOT_ALLOWED
        assert "gateway listener port 15443" in d.message
        assert "gateway listener port 15443" in d.explanation[0].why

    def test_translation_is_one_lookup(self) -> None:
        """translate() is a dict lookup on a map replaced whole: a new map is seen at once,
        and the old mapping object is never mutated (readers hold no lock)."""
        from authz.gateway_ports import GatewayPorts

        ports = GatewayPorts({8443: 443})
        before = ports.current
        ports.replace({8443: 8443})
        assert ports.translate(8443) == 8443
        assert before is not None and dict(before) == {8443: 443}


class TestCheckCommand:
    """`egress-authz check` judges the port as the gateway does."""

    @pytest.mark.parametrize(
        ("extra", "reason"),
        [
            (["--host", "web.kadath.io:80"], "allowed"),  # the Host port is the port dialled
            (["--host", "api.kadath.io:443", "--port", "80"], "port-mismatch"),
            (["--host", "web.kadath.io:8080"], "port-not-allowed"),
        ],
    )
    def test_host_port_and_port_flag(self, tmp_path: Any, capsys: pytest.CaptureFixture[str],
                                     extra: list[str], reason: str) -> None:
        """Without --port an HTTP Host port is the port; with --port a different one is
        port-mismatch."""
        import json
        import textwrap

        from authz import cli

        policy = tmp_path / "p.yaml"
        policy.write_text(textwrap.dedent("""\
            apiVersion: v1
            kind: ConfigMap
            metadata: {name: egress-policy, namespace: shop,
                       labels: {egress-authz.io/policy: "true"}}
            data:
              policy.yaml: |
            """) + textwrap.indent(POLICY.format(mode="enforce"), "    "))
        args = cli.build_parser().parse_args([
            "check", "--policies", str(policy), "--principal",
            "spiffe://cluster.local/ns/shop/sa/cart", "--protocol", "http", "--output", "json",
            *extra])
        args.run(args)
        assert json.loads(capsys.readouterr().out)["reason"] == reason
