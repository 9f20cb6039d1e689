"""Fuzzing the Check path: whatever arrives, the parser never raises and the
service always answers with a CheckResponse (a denial when in doubt)."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckRequest, CheckResponse
from authz.envoy.request import BadRequest, ParsedCheck, parse_check_request
from authz.envoy.server import CHECK_METHOD, AuthzServer, CheckService, ServerSettings
from authz.sources import DirectorySource
from authz.store import PolicyStore
from authz.testing.policies import policy_configmap
from authz.workloads import WorkloadIndex, workload_from_pod

pytestmark = pytest.mark.timeout(120)

POLICY = policy_configmap("egress-policy", "shop", """
    - name: kadath
      workloads: {serviceAccounts: [cart], matchLabels: {function: finance}}
      hosts: ["*.kadath.io", api.stripe.com]
      http: {methods: [GET], paths: [/v1/]}
""")

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def seed_requests() -> list[bytes]:
    """Valid requests of both filters, the material mutations start from."""
    http = CheckRequest()
    a = http.attributes
    a.source.principal = "spiffe://cluster.local/ns/shop/sa/cart"
    a.source.address.socket_address.address = "10.0.0.7"
    a.destination.address.socket_address.port_value = 443
    h = a.request.http
    h.method, h.path, h.host, h.scheme = "GET", "/v1/x", "api.kadath.io", "https"
    h.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    h.headers["user-agent"] = "curl/8"
    raw = CheckRequest()
    raw.CopyFrom(http)
    raw.attributes.request.http.headers.clear()
    hv = raw.attributes.request.http.header_map.headers.add()
    hv.key, hv.raw_value = "tracestate", b"a=b"
    net = CheckRequest()
    net.attributes.source.CopyFrom(a.source)
    net.attributes.destination.CopyFrom(a.destination)
    net.attributes.tls_session.sni = "api.kadath.io"
    return [m.SerializeToString() for m in (http, raw, net)]


SEEDS = seed_requests()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> CheckService:
    d: Path = tmp_path_factory.mktemp("fuzz")
    (d / "p.yaml").write_text(POLICY)
    store = PolicyStore()
    DirectorySource(d).start(store, on_error=print)
    index = WorkloadIndex()
    pod = workload_from_pod({
        "metadata": {"name": "cart-1", "namespace": "shop", "labels": {"function": "finance"}},
        "spec": {"serviceAccountName": "cart"},
        "status": {"phase": "Running", "podIP": "10.0.0.7"},
    })
    assert pod is not None
    index.upsert(pod)
    return CheckService(store, index)


def answer(service: CheckService, data: bytes) -> CheckResponse:
    out = service.check(data)
    response = CheckResponse.FromString(out)
    assert response.HasField("status")
    assert response.dynamic_metadata.fields["decision_id"].string_value
    return response


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            data[pos:pos] = other[draw(st.integers(0, len(other) - 1)) :]
    return bytes(data)


text = st.text(st.characters(codec="utf-8"), max_size=300)
hostish = st.one_of(
    text,
    st.sampled_from([
        "api.kadath.io", "API.KADATH.IO.", "api.kadath.io:443", "api.kadath.io.evil.com",
        "evilkadath.io", "api.kadath.io@evil.com", "%2e.kadath.io", "a\x00.kadath.io",
        "[::1]:443", "10.0.0.1", "xn--caf-dma.kadath.io", "café.kadath.io", "*.kadath.io",
        "a" * 300 + ".kadath.io", "", ".", "..", ":", ":443",
    ]),
)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf with hostile values in every field we read."""
    r = CheckRequest()
    a = r.attributes
    a.source.principal = draw(st.one_of(
        text, st.just("spiffe://cluster.local/ns/shop/sa/cart"),
        st.builds(lambda s: f"spiffe://cluster.local/ns/{s}/sa/cart", text),
    ))
    a.source.address.socket_address.address = draw(st.one_of(text, st.just("10.0.0.7")))
    a.destination.address.socket_address.port_value = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        a.tls_session.sni = draw(hostish)
    if draw(st.booleans()):
        a.destination.service = draw(hostish)
    if draw(st.booleans()):
        h = a.request.http
        h.host = draw(hostish)
        h.method = draw(st.one_of(text, st.sampled_from(["GET", "get", "POST", ""])))
        h.path = draw(st.one_of(text, st.sampled_from(["/v1/", "/v1/../admin", "//", ""])))
        h.scheme = draw(st.sampled_from(["https", "http", "", "gopher"]))
        for k, v in draw(st.dictionaries(text, text, max_size=5)).items():
            h.headers[k] = v
    return r.SerializeToString()


class TestParser:
    @FUZZ
    @given(st.binary(max_size=2048))
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes parse or are refused; nothing raises."""
        assert isinstance(parse_check_request(data), (ParsedCheck, BadRequest))

    @FUZZ
    @given(mutated())
    def test_mutated_valid_requests(self, data: bytes) -> None:
        """Bit flips, insertions, deletions, truncations and splices of real requests."""
        assert isinstance(parse_check_request(data), (ParsedCheck, BadRequest))


class TestService:
    @FUZZ
    @given(st.one_of(st.binary(max_size=1024), mutated()))
    def test_always_answers(self, service: CheckService, data: bytes) -> None:
        """Every body gets a CheckResponse with a status and a decision id."""
        answer(service, data)

    @FUZZ
    @given(structured())
    def test_hostile_values_are_decided(self, service: CheckService, data: bytes) -> None:
        """Hostile principals, hosts, SNIs, paths and headers: an answer, never a crash,
        and an allow only for a request the policy really allows."""
        r = answer(service, data)
        if r.status.code == 0:
            req = CheckRequest.FromString(data)
            assert req.attributes.source.principal == "spiffe://cluster.local/ns/shop/sa/cart"
            assert r.dynamic_metadata.fields["rule"].string_value == "shop/egress-policy/kadath"


def test_mutants_over_grpc(service: CheckService) -> None:
    """Two hundred mutants through a real gRPC server: every call gets a CheckResponse."""
    server = AuthzServer(service.store, service.workloads,
                         settings=ServerSettings(address="127.0.0.1:0"))
    port = server.start()
    rng = random.Random(7)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary(CHECK_METHOD)
            for _ in range(200):
                data = bytearray(rng.choice(SEEDS))
                for _ in range(rng.randint(1, 6)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                CheckResponse.FromString(check(bytes(data), timeout=5))
    finally:
        server.stop(0)
