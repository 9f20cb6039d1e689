"""Decision -> CheckResponse bytes: the last stage of a Check.

The response is written straight in protobuf wire format: a serialised
message is the concatenation of its fields in any order, so the constant
parts (statuses, header names, the 403) are encoded once at import and only
the decision's strings are encoded per request. tests/test_response.py and
tests/test_conformance.py parse every shape with the generated classes and
with envoy-data-plane's full-schema classes.

Field numbers are those of protos/envoy_service_auth_v3.proto (Envoy's).
"""

from __future__ import annotations

import json

from authz.model import Decision

from .request import HTTP_FILTER, NETWORK_FILTER

DECISION_ID_HEADER = "x-egress-authz-decision-id"
DENY_HTTP_STATUS = 403
GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7

# Keys of CheckResponse.dynamic_metadata, under the ext_authz filter's
# namespace (envoy.filters.http.ext_authz / envoy.filters.network.ext_authz):
# access logs read them as %DYNAMIC_METADATA(envoy.filters.http.ext_authz:decision_id)%.
META_DECISION_ID = "decision_id"
META_VERDICT = "verdict"
META_REASON = "reason"
META_RULE = "rule"

_WT_VARINT = 0
_WT_LEN = 2


_SMALL = [bytes([n]) for n in range(0x80)]  # one-byte varints: nearly every length here


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


_LEN_TAGS = {f: _tag(f, _WT_LEN) for f in range(1, 6)}


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field: sub-message, string or bytes."""
    return _LEN_TAGS[field] + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    # "replace": a lone surrogate must not make the message invalid UTF-8 for Envoy.
    return _ld(field, text.encode("utf-8", "replace"))


_OVERWRITE_IF_EXISTS_OR_ADD = _tag(3, _WT_VARINT) + _varint(2)  # HeaderValueOption.append_action


def _header(key: str, value: str) -> bytes:
    """core.v3.HeaderValueOption with append_action OVERWRITE_IF_EXISTS_OR_ADD,
    so that a client cannot smuggle in a decision id of its own."""
    return _ld(1, _str(1, key) + _str(2, value)) + _OVERWRITE_IF_EXISTS_OR_ADD


def _struct_entry(key: str, value: str) -> bytes:
    """One google.protobuf.Struct.fields map entry holding a string Value."""
    return _ld(1, _str(1, key) + _ld(2, _str(3, value)))


# CheckResponse field numbers
_F_STATUS, _F_DENIED, _F_OK, _F_METADATA = 1, 2, 3, 4

_STATUS_OK = _ld(_F_STATUS, b"")  # google.rpc.Status{code: 0}: all defaults
_STATUS_DENIED = _ld(_F_STATUS, _tag(1, _WT_VARINT) + _varint(GRPC_PERMISSION_DENIED))
_HTTP_403 = _ld(1, _tag(1, _WT_VARINT) + _varint(DENY_HTTP_STATUS))  # HttpStatus
_CONTENT_TYPE_JSON = _ld(2, _header("content-type", "application/json"))
_ID_KEY = _str(1, DECISION_ID_HEADER)
_ID_META_KEY = _str(1, META_DECISION_ID)


def _id_header(decision_id: str) -> bytes:
    return _ld(1, _ID_KEY + _str(2, decision_id)) + _OVERWRITE_IF_EXISTS_OR_ADD

# Encoded entries for values that repeat: verdicts, reasons and rules. Bounded
# so that a policy with very many rules cannot grow it without limit.
_ENTRY_CACHE: dict[tuple[str, str], bytes] = {}
_ENTRY_CACHE_MAX = 4096


def _cached_entry(key: str, value: str) -> bytes:
    entry = _ENTRY_CACHE.get((key, value))
    if entry is None:
        entry = _struct_entry(key, value)
        if len(_ENTRY_CACHE) < _ENTRY_CACHE_MAX:
            _ENTRY_CACHE[(key, value)] = entry
    return entry


def _metadata(decision: Decision) -> bytes:
    fields = (
        _ld(1, _ID_META_KEY + _ld(2, _str(3, decision.decision_id)))
        + _cached_entry(META_VERDICT, decision.verdict.value)
        + _cached_entry(META_REASON, decision.reason.value)
    )
    if decision.rule:
        fields += _cached_entry(META_RULE, decision.rule)
    return _ld(_F_METADATA, fields)


# Allowed answers, the bulk of the traffic, differ only in the decision id
# (twice: header and metadata) once the rule, verdict and reason are known, so
# they are cut into constant parts around the id: (before the first id,
# between the two (HTTP only), after the last), keyed by (network filter?,
# verdict, reason, rule, id length). ~1 µs instead of ~5 per allowed Check.
_AllowKey = tuple[bool, str, str, "str | None", int]
_ALLOW_PARTS: dict[_AllowKey, tuple[bytes, bytes, bytes]] = {}
_ALLOW_PARTS_MAX = 4096


def _allow_parts(decision: Decision, network: bool, n: int) -> tuple[bytes, bytes, bytes]:
    """The constant parts of `build_check_response` for an allowed decision
    whose id encodes to `n` bytes (see _ALLOW_PARTS), as _metadata and
    _id_header would write them."""
    tail = _cached_entry(META_VERDICT, decision.verdict.value) + _cached_entry(
        META_REASON, decision.reason.value
    )
    if decision.rule:
        tail += _cached_entry(META_RULE, decision.rule)
    # metadata: Struct{fields: [decision_id entry, *tail]}
    value_len = 1 + len(_varint(n)) + n  # Value{string_value: id}
    entry_len = len(_ID_META_KEY) + 1 + len(_varint(value_len)) + value_len
    fields_len = 1 + len(_varint(entry_len)) + entry_len + len(tail)
    meta_head = (
        _LEN_TAGS[_F_METADATA] + _varint(fields_len)
        + _LEN_TAGS[1] + _varint(entry_len) + _ID_META_KEY
        + _LEN_TAGS[2] + _varint(value_len) + _LEN_TAGS[3] + _varint(n)
    )  # fmt: skip
    if network:
        return _STATUS_OK + meta_head, b"", tail
    # ok_response: OkHttpResponse{headers: [HeaderValueOption{header: {key, value: id}}]}
    header_len = len(_ID_KEY) + 1 + len(_varint(n)) + n
    option_len = 1 + len(_varint(header_len)) + header_len + len(_OVERWRITE_IF_EXISTS_OR_ADD)
    ok_len = 1 + len(_varint(option_len)) + option_len
    ok_head = (
        _LEN_TAGS[_F_OK] + _varint(ok_len)
        + _LEN_TAGS[2] + _varint(option_len)
        + _LEN_TAGS[1] + _varint(header_len) + _ID_KEY + _LEN_TAGS[2] + _varint(n)
    )  # fmt: skip
    return _STATUS_OK + ok_head, _OVERWRITE_IF_EXISTS_OR_ADD + meta_head, tail


def _allowed_response(decision: Decision, network: bool) -> bytes:
    id_bytes = decision.decision_id.encode("utf-8", "replace")
    key = (network, decision.verdict, decision.reason, decision.rule, len(id_bytes))
    parts = _ALLOW_PARTS.get(key)
    if parts is None:
        parts = _allow_parts(decision, network, len(id_bytes))
        if len(_ALLOW_PARTS) < _ALLOW_PARTS_MAX:
            _ALLOW_PARTS[key] = parts
    head, middle, tail = parts
    if network:
        return head + id_bytes + tail
    return head + id_bytes + middle + id_bytes + tail


def deny_body(decision: Decision) -> str:
    """The JSON body of an HTTP denial: a public contract (see README)."""
    return json.dumps(
        {
            "decision_id": decision.decision_id,
            "reason": decision.reason.value,
            "host": decision.host,
            "workload": decision.workload,
            "message": decision.message,
            "explain": f"egress-authz explain {decision.decision_id}",
        },
        separators=(",", ":"),
    )


def _allowed_response_reference(decision: Decision, filter_kind: str) -> bytes:
    """What _allowed_response writes, field by field (tests hold the two together)."""
    if filter_kind == NETWORK_FILTER:
        return _STATUS_OK + _metadata(decision)
    return _STATUS_OK + _ld(_F_OK, _ld(2, _id_header(decision.decision_id))) + _metadata(decision)


def build_check_response(decision: Decision, filter_kind: str) -> bytes:
    """Serialised CheckResponse for one decision.

    `filter_kind` is HTTP_FILTER, NETWORK_FILTER or "" (request unreadable).
    The network filter only reads the status, so it gets no HTTP parts; an
    unreadable request gets the HTTP parts too, since either filter may have
    sent it and the network filter ignores them.
    """
    if decision.allowed:
        return _allowed_response(decision, filter_kind == NETWORK_FILTER)
    if filter_kind == NETWORK_FILTER:
        return _STATUS_DENIED + _metadata(decision)
    id_header = _id_header(decision.decision_id)
    denied = _HTTP_403 + _CONTENT_TYPE_JSON + _ld(2, id_header) + _str(3, deny_body(decision))
    return _STATUS_DENIED + _ld(_F_DENIED, denied) + _metadata(decision)


__all__ = [
    "DECISION_ID_HEADER",
    "HTTP_FILTER",
    "NETWORK_FILTER",
    "build_check_response",
    "deny_body",
]
