"""What Envoy 1.40 actually puts in a CheckRequest on each gateway path.

The service's request parser is written against these facts (recorded in the
comments of istio/envoy/gateway.yaml); if an Envoy upgrade moves a field,
this fails before the service silently starts denying. Uses the recording
floor server, so it does not depend on the service.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from envoy_data_plane.envoy.service.auth.v3 import CheckRequest

from authz.testing.floor import FloorServer
from authz.testing.mesh import GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT, LoopbackMesh
from authz.testing.pki import spiffe_id

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(60)]

CART = spiffe_id("shop", "cart")
GATEWAY = spiffe_id(GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(scope="module")
def probe() -> Iterator[FloorServer]:
    with FloorServer(record=True) as server:
        yield server


@pytest.fixture(scope="module")
def mesh(probe: FloorServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackMesh]:
    with LoopbackMesh(probe.port, workdir=tmp_path_factory.mktemp("fields")) as m:
        yield m


def last_request(probe: FloorServer) -> CheckRequest:
    assert probe.requests, "Envoy sent no CheckRequest"
    return CheckRequest.parse(probe.requests[-1])


@pytest.fixture(scope="module")
def http_check(mesh: LoopbackMesh, probe: FloorServer) -> CheckRequest:
    probe.requests.clear()
    result = mesh.http(
        "API.kadath.io:8443",
        namespace="shop",
        service_account="cart",
        source_ip="127.0.0.3",
        path="/v1/charge?amount=1",
        method="POST",
        headers={"traceparent": TRACEPARENT, "x-forwarded-for": "10.9.9.9"},
    )
    assert result.status == 200, result
    return last_request(probe)


@pytest.fixture(scope="module")
def tls_check(mesh: LoopbackMesh, probe: FloorServer) -> CheckRequest:
    probe.requests.clear()
    result = mesh.tls("api.kadath.io", namespace="shop", service_account="cart", pod_ip="127.0.0.2")
    assert result.reply == b"hello api.kadath.io: ping\n", result
    return last_request(probe)


class TestHTTPFilter:
    def test_principal_is_the_client_certificate_uri_san(self, http_check: CheckRequest) -> None:
        """source.principal is the SPIFFE id of the mTLS client certificate."""
        assert http_check.attributes.source.principal == CART

    def test_source_address_is_the_socket_peer(self, http_check: CheckRequest) -> None:
        """source.address is the bound client address, not a forged X-Forwarded-For."""
        assert http_check.attributes.source.address.socket_address.address == "127.0.0.3"

    def test_destination_is_the_listener(
        self, http_check: CheckRequest, mesh: LoopbackMesh
    ) -> None:
        """destination.address is the gateway listener; destination.principal its SAN."""
        dest = http_check.attributes.destination
        assert dest.address.socket_address.port_value == mesh.http_port
        assert dest.principal == GATEWAY
        assert not dest.service

    def test_http_attributes_as_sent(self, http_check: CheckRequest) -> None:
        """Host keeps its case and port; method, path with query, scheme of the outer mTLS."""
        http = http_check.attributes.request.http
        assert http.host == "API.kadath.io:8443"
        assert http.method == "POST"
        assert http.path == "/v1/charge?amount=1"
        assert http.scheme == "https"
        assert http.protocol == "HTTP/1.1"

    def test_headers_carry_traceparent(self, http_check: CheckRequest) -> None:
        """All headers are sent, traceparent included, plus Envoy's own."""
        headers = http_check.attributes.request.http.headers
        assert headers["traceparent"] == TRACEPARENT
        assert headers[":authority"] == "API.kadath.io:8443"
        assert "x-request-id" in headers

    def test_tls_session_carries_the_outer_sni(self, http_check: CheckRequest) -> None:
        """include_tls_session on the HTTP filter: the mTLS SNI as the client sent it."""
        assert http_check.attributes.tls_session is not None
        assert http_check.attributes.tls_session.sni == "API.kadath.io"


class TestHTTPSidecar:
    def test_auto_sni_makes_the_sni_the_host(self, mesh: LoopbackMesh, probe: FloorServer) -> None:
        """Through sidecar-http.yaml the outer SNI is the Host without its :port (case kept)."""
        sidecar = mesh.sidecar("shop", "cart", "127.0.0.2", kind="http")
        conn = http.client.HTTPConnection("127.0.0.1", mesh.listen_port(sidecar), timeout=5)
        try:
            conn.request("GET", "/", headers={"Host": "API.Kadath.io:8443"})
            assert conn.getresponse().status == 200
        finally:
            conn.close()
        attrs = last_request(probe).attributes
        assert attrs.tls_session is not None
        assert attrs.tls_session.sni == "API.Kadath.io"
        assert attrs.request.http.host == "API.Kadath.io:8443"
        assert attrs.source.address.socket_address.address == "127.0.0.2"
        assert attrs.source.principal == CART


class TestNetworkFilter:
    def test_principal_and_source(self, tls_check: CheckRequest) -> None:
        """The sidecar's certificate and bind address (the pod IP) reach the service."""
        assert tls_check.attributes.source.principal == CART
        assert tls_check.attributes.source.address.socket_address.address == "127.0.0.2"

    def test_sni_in_tls_session(self, tls_check: CheckRequest) -> None:
        """With include_tls_session the outer mTLS SNI (the external host) is sent."""
        assert tls_check.attributes.tls_session is not None
        assert tls_check.attributes.tls_session.sni == "api.kadath.io"

    def test_no_destination_service_and_no_http(
        self, tls_check: CheckRequest, mesh: LoopbackMesh
    ) -> None:
        """TLS terminated at the gateway: destination.service unset, no HTTP request."""
        dest = tls_check.attributes.destination
        assert not dest.service
        assert dest.principal == GATEWAY
        assert dest.address.socket_address.port_value == mesh.tls_port
        assert tls_check.attributes.request is None
