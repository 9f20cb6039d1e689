"""CheckRequest bytes -> Identity + Destination: the first stage of a Check.

Parsing happens here, on raw bytes, rather than in gRPC's deserializer, so
that a malformed body becomes a `bad-request` denial instead of a gRPC error.
Only the attributes Envoy's ext_authz filters send about the connection are
read; request headers never establish identity (only W3C trace context is
taken from them, to join the decision's span to Envoy's trace).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from authz.model import Destination, Identity, Protocol

from .gen.envoy_service_auth_v3_pb2 import AttributeContext, CheckRequest

# Bounds on what one CheckRequest may carry. Envoy's own defaults stay well
# inside them (60 KiB of request headers, at most 100 headers); anything
# beyond is not a request a gateway would send, so it is denied unread.
MAX_REQUEST_BYTES = 256 * 1024
MAX_HEADERS = 256
MAX_FIELD_CHARS = 16 * 1024  # host, path, method, SNI, principal
MAX_TRACE_HEADER_CHARS = 512  # W3C: traceparent is 55 chars, tracestate <= 512

HTTP_FILTER = "http"
NETWORK_FILTER = "network"

# principal, source address -> Identity: authz.identity.IdentityResolver, which
# finds the Pod at the address; without one, the Identity carries no Pod.
IdentityResolve = Callable[[str, str], Identity]
PortTranslation = Callable[[int], int]  # gateway listener port -> the port the app dialled


@dataclass(slots=True)  # not frozen: built once per Check, and frozen costs ~1.5 µs
class ParsedCheck:
    """A CheckRequest that can be decided."""

    identity: Identity
    destination: Destination
    filter: str  # HTTP_FILTER or NETWORK_FILTER: which Envoy filter asked
    traceparent: str | None = None
    tracestate: str | None = None


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A CheckRequest that cannot be decided: answered with a `bad-request` deny."""

    message: str
    filter: str = ""  # "" when the body could not even be read
    traceparent: str | None = None
    tracestate: str | None = None


def parse_check_request(
    data: bytes, resolve: IdentityResolve | None = None, ports: PortTranslation | None = None
) -> ParsedCheck | BadRequest:
    """Parse one serialised CheckRequest; never raises.

    `resolve` makes the Identity from the principal and source address (the
    server's IdentityResolver finds the Pod behind the address); without it
    the Identity carries no Pod. `ports` translates the gateway listener port
    (GatewayPorts.translate); without it the listener port is judged as is.
    """
    try:
        return _parse(data, Identity if resolve is None else resolve, ports)
    except Exception as e:  # the parser must not take the server down, whatever arrives
        return BadRequest(f"unreadable CheckRequest: {type(e).__name__}: {_clip(str(e))}")


def _parse(
    data: bytes, resolve: IdentityResolve, ports: PortTranslation | None
) -> ParsedCheck | BadRequest:
    if len(data) > MAX_REQUEST_BYTES:
        return BadRequest(f"CheckRequest of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
    request = CheckRequest()
    try:
        request.ParseFromString(data)
    except DecodeError as e:
        return BadRequest(f"malformed CheckRequest: {_clip(str(e))}")
    if not request.HasField("attributes"):
        return BadRequest("CheckRequest carries no attributes")
    attrs = request.attributes
    source = attrs.source
    principal = source.principal
    source_ip = _ip(source.address.socket_address.address)
    listener = attrs.destination.address.socket_address.port_value
    # The listener port is the gateway pod's, not the one the app dialled.
    port = ports(listener) if ports is not None and listener else listener
    sni = attrs.tls_session.sni or None

    request_ctx = attrs.request
    if request_ctx.HasField("http"):
        return _http(request_ctx.http, principal, source_ip, listener, port, sni, resolve)

    # The network filter sends no request: the destination name is the SNI,
    # from tls_session when the filter sets include_tls_session, else from
    # destination.service, which Envoy fills with the SNI under TLS passthrough.
    sni = sni or attrs.destination.service or None
    if max(len(principal), len(sni or "")) > MAX_FIELD_CHARS:
        return BadRequest(_too_long(principal=principal, sni=sni), NETWORK_FILTER)
    return ParsedCheck(
        identity=resolve(principal, source_ip),
        destination=Destination(
            port=port, protocol=Protocol.TLS, sni=sni, listener_port=listener
        ),
        filter=NETWORK_FILTER,
    )


def _http(
    http: AttributeContext.HttpRequest,
    principal: str,
    source_ip: str,
    listener: int,
    port: int,
    sni: str | None,
    resolve: IdentityResolve,
) -> ParsedCheck | BadRequest:
    headers = http.headers
    traceparent = tracestate = None
    if headers:
        if len(headers) > MAX_HEADERS:
            return BadRequest(f"{len(headers)} request headers exceed {MAX_HEADERS}", HTTP_FILTER)
        traceparent = headers.get("traceparent")
        tracestate = headers.get("tracestate")
    elif http.HasField("header_map"):  # the filter's encode_raw_headers form
        header_map = http.header_map.headers
        if len(header_map) > MAX_HEADERS:
            return BadRequest(f"{len(header_map)} request headers exceed {MAX_HEADERS}",
                              HTTP_FILTER)
        for h in header_map:
            key = h.key.lower()
            if key == "traceparent":
                traceparent = h.value or h.raw_value.decode("utf-8", "replace")
            elif key == "tracestate":
                tracestate = h.value or h.raw_value.decode("utf-8", "replace")
    # Broken trace context is dropped, not denied: tracing must not decide.
    if traceparent is not None and len(traceparent) > MAX_TRACE_HEADER_CHARS:
        traceparent = None
    if tracestate is not None and len(tracestate) > MAX_TRACE_HEADER_CHARS:
        tracestate = None

    host, path, method = http.host, http.path, http.method
    if max(len(principal), len(host), len(path), len(method), len(sni or "")) > MAX_FIELD_CHARS:
        too_long = _too_long(principal=principal, sni=sni, host=host, path=path, method=method)
        return BadRequest(too_long, HTTP_FILTER, traceparent, tracestate)
    if not listener:  # no listener address: fall back on the scheme's port
        port = {"https": 443, "http": 80}.get(http.scheme, 0)
    return ParsedCheck(
        identity=resolve(principal, source_ip),
        destination=Destination(
            port=port,
            protocol=Protocol.HTTP,
            sni=sni,
            http_host=host or None,
            method=method or None,
            path=path or None,
            listener_port=listener,
        ),
        filter=HTTP_FILTER,
        traceparent=traceparent,
        tracestate=tracestate,
    )


def _ip(address: str) -> str:
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; Pods are
    # indexed by their plain IPv4 address.
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def _too_long(**fields: str | None) -> str:
    for name, value in fields.items():
        if value is not None and len(value) > MAX_FIELD_CHARS:
            return f"{name} of {len(value)} characters exceeds {MAX_FIELD_CHARS}"
    return ""


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
