"""Conformance against Envoy's full ext_authz schema (envoy-data-plane, betterproto2).

Requests are built with the full-schema classes, including the fields our
minimal protos leave out, and sent over gRPC through envoy-data-plane's own
stub (so the method path is Envoy's); every response is parsed with the
full-schema classes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    HeaderMap,
    HeaderValue,
    Metadata,
    SocketAddress,
)
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContext,
    AttributeContextHttpRequest,
    AttributeContextPeer,
    AttributeContextRequest,
    AttributeContextTlsSession,
    AuthorizationSyncStub,
    CheckRequest,
    CheckResponse,
)
from envoy_data_plane.google.protobuf import Struct, Value

from authz.envoy.gen import envoy_service_auth_v3_pb2
from authz.envoy.response import DECISION_ID_HEADER
from authz.envoy.server import CHECK_METHOD, AuthzServer, ServerSettings
from authz.sources import DirectorySource
from authz.store import PolicyStore
from authz.testing.policies import policy_configmap

pytestmark = pytest.mark.timeout(60)

CART = "spiffe://cluster.local/ns/shop/sa/cart"
GATEWAY = "spiffe://cluster.local/ns/istio-system/sa/egressgateway"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

POLICY = policy_configmap("egress-policy", "shop", """
    - name: kadath
      workloads: {serviceAccounts: [cart]}
      hosts: ["*.kadath.io"]
      ports: [443, 8443]
""")


def peer(address: str, port: int, principal: str = "", **kw: object) -> AttributeContextPeer:
    return AttributeContextPeer(
        address=Address(socket_address=SocketAddress(address=address, port_value=port)),
        principal=principal,
        **kw,  # type: ignore[arg-type]
    )


def full_attributes(**kw: object) -> AttributeContext:
    """Every field Envoy may fill that we do not model, so that skipping them is tested."""
    return AttributeContext(
        source=peer("127.0.0.3", 51000, CART, certificate="-----BEGIN CERTIFICATE-----",
                    labels={"app": "cart"}),
        destination=peer("127.0.0.1", 8443, GATEWAY),
        context_extensions={"virtual_host": "egress"},
        metadata_context=Metadata(
            filter_metadata={"istio": Struct(fields={"k": Value(string_value="v")})}
        ),
        **kw,  # type: ignore[arg-type]
    )


def http_check(host: str, *, raw_headers: bool = False) -> CheckRequest:
    http = AttributeContextHttpRequest(
        id="17", method="POST", path="/v1/charge?amount=1", host=host, scheme="https",
        protocol="HTTP/1.1", query="amount=1", size=3, body="abc", raw_body=b"abc",
    )
    headers = {":authority": host, "traceparent": TRACEPARENT, "x-request-id": "r1"}
    if raw_headers:  # the filter's encode_raw_headers form
        http.header_map = HeaderMap(
            headers=[HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
        )
    else:
        http.headers = headers
    return CheckRequest(
        attributes=full_attributes(
            request=AttributeContextRequest(
                time=datetime.datetime.now(datetime.UTC), http=http
            ),
        )
    )


def network_check(sni: str) -> CheckRequest:
    return CheckRequest(attributes=full_attributes(tls_session=AttributeContextTlsSession(sni=sni)))


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthorizationSyncStub]:
    d = tmp_path_factory.mktemp("conformance")
    (d / "policy.yaml").write_text(POLICY)
    store = PolicyStore()
    source = DirectorySource(d)
    source.start(store, on_error=print)
    server = AuthzServer(store, settings=ServerSettings(address="127.0.0.1:0"))
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield AuthorizationSyncStub(channel)
    channel.close()
    source.stop()
    server.stop(0)


def meta(r: CheckResponse) -> dict[str, str]:
    assert r.dynamic_metadata is not None
    return {k: v.string_value or "" for k, v in r.dynamic_metadata.fields.items()}


class TestSchema:
    def test_method_path_is_envoys(self) -> None:
        """Our service descriptor names the method exactly as Envoy calls it."""
        svc = envoy_service_auth_v3_pb2.DESCRIPTOR.services_by_name["Authorization"]
        assert f"/{svc.full_name}/{svc.methods[0].name}" == CHECK_METHOD
        assert CHECK_METHOD == "/envoy.service.auth.v3.Authorization/Check"

    def test_full_request_parses_with_our_classes(self) -> None:
        """A full-schema request reads back through our minimal classes, field for field."""
        ours = envoy_service_auth_v3_pb2.CheckRequest.FromString(bytes(http_check("a.kadath.io")))
        a = ours.attributes
        assert a.source.principal == CART
        assert a.source.address.socket_address.address == "127.0.0.3"
        assert a.destination.address.socket_address.port_value == 8443
        assert a.request.http.host == "a.kadath.io"
        assert a.request.http.headers["traceparent"] == TRACEPARENT


class TestHTTPFilter:
    @pytest.mark.parametrize("raw_headers", [False, True], ids=["headers", "header_map"])
    def test_allowed(self, stub: AuthorizationSyncStub, raw_headers: bool) -> None:
        """OK, the decision id on the upstream request, metadata for access logs."""
        r = stub.check(http_check("API.kadath.io:8443", raw_headers=raw_headers))
        assert r.status is not None and r.status.code == 0
        assert r.ok_response is not None and r.denied_response is None
        (h,) = r.ok_response.headers
        assert h.header is not None and h.header.key == DECISION_ID_HEADER
        m = meta(r)
        assert (m["verdict"], m["reason"], m["rule"]) == (
            "allow", "allowed", "shop/egress-policy/kadath"
        )
        assert h.header.value == m["decision_id"]

    def test_denied(self, stub: AuthorizationSyncStub) -> None:
        """PERMISSION_DENIED with a 403 JSON body naming the reason and the workload."""
        r = stub.check(http_check("evil.example"))
        assert r.status is not None and r.status.code == 7
        assert r.denied_response is not None and r.denied_response.status is not None
        assert int(r.denied_response.status.code) == 403
        body = json.loads(r.denied_response.body)
        assert body["reason"] == "host-not-allowed"
        assert body["workload"] == "shop/cart"
        assert body["host"] == "evil.example"
        assert body["decision_id"] == meta(r)["decision_id"]


class TestNetworkFilter:
    def test_allowed(self, stub: AuthorizationSyncStub) -> None:
        """OK, no HTTP parts."""
        r = stub.check(network_check("api.kadath.io"))
        assert r.status is not None and r.status.code == 0
        assert r.ok_response is None and r.denied_response is None
        assert meta(r)["verdict"] == "allow"

    def test_denied(self, stub: AuthorizationSyncStub) -> None:
        """PERMISSION_DENIED: Envoy closes the connection."""
        r = stub.check(network_check("kadath.io"))  # the apex is not under *.kadath.io
        assert r.status is not None and r.status.code == 7
        assert r.denied_response is None
        assert meta(r)["reason"] == "host-not-allowed"

    def test_no_attributes_is_bad_request(self, stub: AuthorizationSyncStub) -> None:
        """An empty CheckRequest is answered, with bad-request."""
        r = stub.check(CheckRequest())
        assert r.status is not None and r.status.code == 7
        assert meta(r)["reason"] == "bad-request"


def test_policy_fixture_is_valid(tmp_path: Path) -> None:
    """The module's policy loads without problems (guards the other tests' premise)."""
    from authz.loader import load_path

    (tmp_path / "p.yaml").write_text(POLICY)
    assert load_path(tmp_path).problems == []
