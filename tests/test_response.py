"""authz.envoy.response: Decision -> CheckResponse bytes, read back by both schemas."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from envoy_data_plane.envoy.service.auth.v3 import CheckResponse as FullCheckResponse
from google.protobuf import json_format

from authz.engine import reject
from authz.envoy.gen.envoy_service_auth_v3_pb2 import CheckResponse
from authz.envoy.response import (
    DECISION_ID_HEADER,
    HTTP_FILTER,
    NETWORK_FILTER,
    build_check_response,
)
from authz.model import Decision, Reason, Verdict

OVERWRITE_IF_EXISTS_OR_ADD = 2


def denial(**changes: object) -> Decision:
    d = reject(
        Reason.HOST_NOT_ALLOWED,
        "shop/cart may not reach evil.example",
        revision=3,
        host="evil.example",
        namespace="shop",
        service_account="cart",
    )
    return replace(d, **changes)


def allowance(**changes: object) -> Decision:
    d = replace(
        denial(),
        allowed=True,
        verdict=Verdict.ALLOW,
        reason=Reason.ALLOWED,
        rule="shop/egress-policy/payments",
        host="api.kadath.io",
        message="",
    )
    return replace(d, **changes)


def parsed(decision: Decision, filter_kind: str) -> CheckResponse:
    data = build_check_response(decision, filter_kind)
    r = CheckResponse()
    r.ParseFromString(data)
    assert r.SerializeToString() != b""  # round trips through the generated classes
    return r


def metadata(r: CheckResponse) -> dict[str, object]:
    return json_format.MessageToDict(r.dynamic_metadata)


class TestAllow:
    def test_http_ok_with_decision_id_header(self) -> None:
        """OK status; the decision id header overwrites any client-sent one."""
        d = allowance()
        r = parsed(d, HTTP_FILTER)
        assert r.HasField("status") and r.status.code == 0
        assert r.WhichOneof("http_response") == "ok_response"
        (h,) = r.ok_response.headers
        assert (h.header.key, h.header.value) == (DECISION_ID_HEADER, d.decision_id)
        assert h.append_action == OVERWRITE_IF_EXISTS_OR_ADD

    def test_network_ok_has_no_http_parts(self) -> None:
        """The network filter reads only the status."""
        r = parsed(allowance(), NETWORK_FILTER)
        assert r.status.code == 0
        assert r.WhichOneof("http_response") is None

    def test_audit_is_allowed_and_says_so_in_metadata(self) -> None:
        """Audit mode: Envoy is told OK; the metadata carries verdict audit."""
        d = allowance(verdict=Verdict.AUDIT, reason=Reason.HOST_NOT_ALLOWED)
        r = parsed(d, HTTP_FILTER)
        assert r.status.code == 0
        assert metadata(r)["verdict"] == "audit"
        assert metadata(r)["reason"] == "host-not-allowed"


class TestDeny:
    def test_http_403_with_json_reason(self) -> None:
        """HTTP filter: PERMISSION_DENIED, 403, the JSON body of the README contract."""
        d = denial()
        r = parsed(d, HTTP_FILTER)
        assert r.status.code == 7
        assert r.WhichOneof("http_response") == "denied_response"
        assert r.denied_response.status.code == 403
        headers = {h.header.key: h.header.value for h in r.denied_response.headers}
        assert headers == {"content-type": "application/json", DECISION_ID_HEADER: d.decision_id}
        body = json.loads(r.denied_response.body)
        assert body == {
            "decision_id": d.decision_id,
            "reason": "host-not-allowed",
            "host": "evil.example",
            "workload": "shop/cart",
            "message": "shop/cart may not reach evil.example",
            "explain": f"egress-authz explain {d.decision_id}",
        }

    def test_network_permission_denied_only(self) -> None:
        """Network filter: PERMISSION_DENIED; Envoy closes the connection."""
        r = parsed(denial(), NETWORK_FILTER)
        assert r.status.code == 7
        assert r.WhichOneof("http_response") is None

    def test_unknown_filter_gets_the_http_denial(self) -> None:
        """An unreadable request may come from either filter: HTTP parts are included."""
        r = parsed(denial(reason=Reason.BAD_REQUEST), "")
        assert r.status.code == 7 and r.denied_response.status.code == 403

    def test_unicode_and_surrogates_stay_valid_utf8(self) -> None:
        """Odd characters in a message never produce a response Envoy cannot parse."""
        d = denial(message="caf\u00e9 \ud800 \u2603", host="xn--caf-dma.example")
        r = parsed(d, HTTP_FILTER)
        assert json.loads(r.denied_response.body)["message"].startswith("caf\u00e9 ")


class TestMetadata:
    @pytest.mark.parametrize("filter_kind", [HTTP_FILTER, NETWORK_FILTER, ""])
    def test_decision_fields(self, filter_kind: str) -> None:
        """decision_id, verdict, reason and rule, for Envoy's access logs."""
        d = allowance()
        assert metadata(parsed(d, filter_kind)) == {
            "decision_id": d.decision_id,
            "verdict": "allow",
            "reason": "allowed",
            "rule": "shop/egress-policy/payments",
        }

    def test_rule_omitted_when_none(self) -> None:
        """No rule decided: the key is absent (access logs print '-')."""
        assert "rule" not in metadata(parsed(denial(), HTTP_FILTER))


class TestFullSchema:
    @pytest.mark.parametrize("decision", [allowance(), denial()], ids=["allow", "deny"])
    @pytest.mark.parametrize("filter_kind", [HTTP_FILTER, NETWORK_FILTER])
    def test_envoy_data_plane_reads_the_same(self, decision: Decision, filter_kind: str) -> None:
        """envoy-data-plane's full-schema classes parse every shape to the same values."""
        full = FullCheckResponse.parse(build_check_response(decision, filter_kind))
        assert full.status is not None
        assert full.status.code == (0 if decision.allowed else 7)
        assert full.dynamic_metadata is not None
        assert full.dynamic_metadata.fields["decision_id"].string_value == decision.decision_id
        if filter_kind == HTTP_FILTER and not decision.allowed:
            assert full.denied_response is not None
            assert full.denied_response.status is not None
            assert int(full.denied_response.status.code) == 403
        if filter_kind == HTTP_FILTER and decision.allowed:
            assert full.ok_response is not None
            assert full.ok_response.headers[0].header is not None
            assert full.ok_response.headers[0].header.value == decision.decision_id


@pytest.mark.parametrize("filter_kind", [HTTP_FILTER, NETWORK_FILTER, ""])
@pytest.mark.parametrize("decision_id", ["3d8de22789000002", "", "x" * 127, "é" * 70, "y" * 300])
@pytest.mark.parametrize("rule", ["shop/egress-policy/payments", None, "r" * 200])
@pytest.mark.parametrize("verdict", [Verdict.ALLOW, Verdict.AUDIT])
def test_allowed_fast_path_is_the_reference_encoding(
    filter_kind: str, decision_id: str, rule: str | None, verdict: Verdict
) -> None:
    """Allowed answers come from cached parts around the id; byte for byte the
    field-by-field encoding, for ids and rules whose lengths need multi-byte varints."""
    from authz.envoy.response import _allowed_response_reference

    d = allowance(decision_id=decision_id, rule=rule, verdict=verdict)
    assert build_check_response(d, filter_kind) == _allowed_response_reference(d, filter_kind)
    assert build_check_response(d, filter_kind) == _allowed_response_reference(d, filter_kind)
