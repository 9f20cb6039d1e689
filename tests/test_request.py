"""authz.envoy.request: CheckRequest bytes -> Identity + Destination, or bad-request."""

from __future__ import annotations

import pytest

from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest
from authz.envoy.request import (
    HTTP_FILTER,
    MAX_FIELD_CHARS,
    MAX_HEADERS,
    MAX_REQUEST_BYTES,
    NETWORK_FILTER,
    BadRequest,
    ParsedCheck,
    parse_check_request,
)
from authz.identity import IdentityResolver
from authz.model import Protocol, Workload

CART = "spiffe://cluster.local/ns/shop/sa/cart"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def network_request(sni: str = "api.kadath.io", *, service: str = "") -> CheckRequest:
    """What Envoy 1.40's network filter sends behind an mTLS listener."""
    r = CheckRequest()
    a = r.attributes
    a.source.principal = CART
    a.source.address.socket_address.address = "10.1.2.3"
    a.source.address.socket_address.port_value = 40000
    a.destination.address.socket_address.address = "10.9.9.9"
    a.destination.address.socket_address.port_value = 443
    a.destination.principal = "spiffe://cluster.local/ns/istio-system/sa/egressgateway"
    if service:
        a.destination.service = service
    if sni:
        a.tls_session.sni = sni
    return r


def http_request(host: str = "api.kadath.io", **headers: str) -> CheckRequest:
    """What Envoy 1.40's HTTP filter sends behind an mTLS listener."""
    r = network_request(sni="")
    http = r.attributes.request.http
    http.id = "1234"
    http.method = "POST"
    http.path = "/v1/charge?amount=1"
    http.host = host
    http.scheme = "https"
    http.protocol = "HTTP/1.1"
    http.headers[":authority"] = host
    for k, v in headers.items():
        http.headers[k] = v
    return r


def parse(r: CheckRequest, lookup=None) -> ParsedCheck:
    data = r.SerializeToString()
    parsed = parse_check_request(data, IdentityResolver(lookup)) if lookup else (
        parse_check_request(data))
    assert isinstance(parsed, ParsedCheck), parsed
    return parsed


def bad(data: bytes) -> BadRequest:
    parsed = parse_check_request(data)
    assert isinstance(parsed, BadRequest), parsed
    return parsed


class TestHTTPFilter:
    def test_identity_and_destination(self) -> None:
        """principal, source IP, Host, method, path and listener port are read as sent."""
        p = parse(http_request("API.kadath.io:8443"))
        assert p.filter == HTTP_FILTER
        assert p.identity.principal == CART
        assert p.identity.source_ip == "10.1.2.3"
        assert p.identity.workload is None
        d = p.destination
        assert (d.protocol, d.port, d.http_host, d.method, d.path, d.sni) == (
            Protocol.HTTP, 443, "API.kadath.io:8443", "POST", "/v1/charge?amount=1", None
        )

    def test_trace_context_from_headers(self) -> None:
        """traceparent and tracestate are taken from the request headers."""
        p = parse(http_request(traceparent=TRACEPARENT, tracestate="a=b"))
        assert (p.traceparent, p.tracestate) == (TRACEPARENT, "a=b")

    def test_trace_context_from_raw_header_map(self) -> None:
        """encode_raw_headers: header_map is read when the headers map is empty."""
        r = http_request()
        r.attributes.request.http.headers.clear()
        hv = r.attributes.request.http.header_map.headers.add()
        hv.key, hv.raw_value = "traceparent", TRACEPARENT.encode()
        assert parse(r).traceparent == TRACEPARENT

    def test_oversized_trace_header_is_dropped_not_denied(self) -> None:
        """Broken trace context never decides a request."""
        p = parse(http_request(traceparent="x" * 5000))
        assert p.traceparent is None

    def test_headers_never_establish_identity(self) -> None:
        """Identity headers a client could forge are ignored: only the mTLS principal counts."""
        r = http_request(**{"x-forwarded-client-cert": f"URI={CART}", "x-spiffe-id": CART})
        r.attributes.source.principal = ""
        p = parse(r)
        assert p.identity.principal == ""

    def test_tls_session_sni_is_passed_for_the_fronting_check(self) -> None:
        """With include_tls_session the SNI reaches the engine next to the Host."""
        r = http_request()
        r.attributes.tls_session.sni = "other.example"
        assert parse(r).destination.sni == "other.example"

    def test_port_from_scheme_without_listener_address(self) -> None:
        """No destination address: the scheme's default port."""
        r = http_request()
        r.attributes.destination.ClearField("address")
        assert parse(r).destination.port == 443
        r.attributes.request.http.scheme = "http"
        assert parse(r).destination.port == 80

    def test_workload_lookup_by_source_ip(self) -> None:
        """The resolver is asked for the source IP; its Pod becomes identity.workload."""
        pod = Workload("shop", "cart", name="cart-1", ip="10.1.2.3")
        asked: list[str] = []

        def lookup(ip: str) -> Workload | None:
            asked.append(ip)
            return pod

        identity = parse(http_request(), lookup).identity
        assert identity.workload is pod and identity.pod_required
        assert asked == ["10.1.2.3"]

    def test_ipv4_mapped_source(self) -> None:
        """A dual-stack listener's ::ffff:a.b.c.d is the Pod's plain IPv4 address."""
        r = http_request()
        r.attributes.source.address.socket_address.address = "::ffff:10.1.2.3"
        assert parse(r).identity.source_ip == "10.1.2.3"


class TestNetworkFilter:
    def test_sni_from_tls_session(self) -> None:
        """include_tls_session: the SNI is attributes.tls_session.sni; protocol TLS."""
        p = parse(network_request("api.kadath.io"))
        assert p.filter == NETWORK_FILTER
        assert (p.destination.protocol, p.destination.sni, p.destination.port) == (
            Protocol.TLS, "api.kadath.io", 443
        )
        assert p.destination.http_host is None
        assert p.traceparent is None

    def test_sni_falls_back_on_destination_service(self) -> None:
        """TLS passthrough without include_tls_session: destination.service carries the SNI."""
        p = parse(network_request(sni="", service="api.kadath.io"))
        assert p.destination.sni == "api.kadath.io"

    def test_no_sni_left_to_the_engine(self) -> None:
        """No name at all parses; the engine answers invalid-host with its own message."""
        assert parse(network_request(sni="")).destination.sni is None


class TestBadRequest:
    @pytest.mark.parametrize(
        "data",
        [b"\xff\xff\xff\xff", b"\x0a\x05\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\x08"],
        ids=["garbage", "truncated", "huge-length", "dangling-tag"],
    )
    def test_malformed_bytes(self, data: bytes) -> None:
        """Unreadable bodies are bad requests, not exceptions."""
        assert "CheckRequest" in bad(data).message

    def test_empty_body_has_no_attributes(self) -> None:
        """An empty CheckRequest is valid protobuf but carries nothing to decide on."""
        assert bad(b"").message == "CheckRequest carries no attributes"

    def test_truncated_valid_request(self) -> None:
        """Every strict prefix of a real request parses or is refused, never raises."""
        data = http_request(traceparent=TRACEPARENT).SerializeToString()
        for n in range(len(data)):
            assert isinstance(parse_check_request(data[:n]), (ParsedCheck, BadRequest))

    def test_invalid_utf8_string(self) -> None:
        """proto3 strings must be UTF-8: a raw 0xff in the principal is refused."""
        r = network_request()
        r.attributes.source.principal = "PLACEHOLDER"
        data = r.SerializeToString().replace(b"PLACEHOLDER", b"\xffLACEHOLDER")
        assert "malformed" in bad(data).message

    def test_too_large(self) -> None:
        """A request over MAX_REQUEST_BYTES is refused unread."""
        r = http_request(big="x" * MAX_REQUEST_BYTES)
        assert "exceeds" in bad(r.SerializeToString()).message

    def test_too_many_headers(self) -> None:
        """More headers than any gateway forwards: bad-request, with the filter known."""
        r = http_request(**{f"h{i}": "v" for i in range(MAX_HEADERS + 1)})
        b = bad(r.SerializeToString())
        assert (b.filter, "request headers exceed" in b.message) == (HTTP_FILTER, True)

    @pytest.mark.parametrize("field", ["host", "path", "method"])
    def test_field_too_long(self, field: str) -> None:
        """Absurdly long strings are refused before they reach the host matcher."""
        r = http_request()
        setattr(r.attributes.request.http, field, "a" * (MAX_FIELD_CHARS + 1))
        assert bad(r.SerializeToString()).message.startswith(f"{field} of ")

    def test_lookup_failure_is_contained(self) -> None:
        """Even a failing resolver turns into a bad-request, not an exception."""

        def broken(ip: str) -> Workload | None:
            raise KeyError(ip)

        b = parse_check_request(http_request().SerializeToString(), IdentityResolver(broken))
        assert isinstance(b, BadRequest) and "KeyError" in b.message
