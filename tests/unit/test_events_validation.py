"""Event validation, acks and error frames (protocol.md §5.1-5.3)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pocketbridge.protocol import (
    ErrorFrame,
    NewEvent,
    Rejection,
    ack_stored,
    validate_event,
)
from pocketbridge.protocol.events import b64_decoded_size

U = "29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7"
K = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
D = "550e8400-e29b-41d4-a716-446655440000"
EVENT_ID = "01890a5d-ac96-774b-bcce-b302099a8057"
NOW = 1_760_000_000_000
SKEW = 300_000
MAX_PAYLOAD = 64
DROP = object()  # marks a key to remove


def event(**overrides: Any) -> dict[str, Any]:
    base = {
        "event_id": EVENT_ID,
        "user_id": U,
        "device_id": D,
        "device_seq": 42,
        "stream_id": "clipboard:main",
        "type": "clipboard:text",
        "encrypted_payload": "q83vASNFZ4mrze8BI0Vn",
        "ttl": NOW + 3_600_000,
    }
    merged = {**base, **overrides}
    return {k: v for k, v in merged.items() if v is not DROP}


def validate(payload: Any) -> NewEvent | Rejection | ErrorFrame:
    return validate_event(
        payload, session_user=U, bound_key=K, device_id=D, now_ms=NOW, max_payload_bytes=MAX_PAYLOAD, clock_skew_ms=SKEW
    )


def test_valid_event() -> None:
    assert validate(event()) == NewEvent(
        event_id=EVENT_ID,
        user_id=U,
        device_id=D,
        device_seq=42,
        stream_id="clipboard:main",
        type="clipboard:text",
        encrypted_payload="q83vASNFZ4mrze8BI0Vn",
        payload_size=15,
        ttl=NOW + 3_600_000,
    )


def test_ids_are_lowercased_and_extra_keys_ignored() -> None:
    result = validate(event(event_id=EVENT_ID.upper(), device_id=D.upper(), user_id=U.upper(), stream_seq=9, x=1))
    assert isinstance(result, NewEvent)
    assert (result.event_id, result.device_id, result.user_id) == (EVENT_ID, D, U)


@pytest.mark.parametrize("user_id", [DROP, None, "", "   ", "\t\n"])
def test_blank_user_id_is_filled(user_id: object) -> None:
    result = validate(event(user_id=user_id))
    assert isinstance(result, NewEvent) and result.user_id == U


@pytest.mark.parametrize("user_id", [K, K.upper()])
def test_bound_key_accepted_and_stored_as_u(user_id: str) -> None:
    result = validate(event(user_id=user_id))
    assert isinstance(result, NewEvent) and result.user_id == U


@pytest.mark.parametrize(
    ("seq", "expected"), [(1, 1), (5.0, 5), (2**53 - 1, 2**53 - 1), (9007199254740991.0, 2**53 - 1)]
)
def test_device_seq_accepted(seq: object, expected: int) -> None:
    result = validate(event(device_seq=seq))
    assert isinstance(result, NewEvent) and result.device_seq == expected and type(result.device_seq) is int


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [(DROP, None), (None, None), (0, None), (0.0, None), (NOW, NOW), (NOW - SKEW, NOW - SKEW), (float(NOW), NOW)],
)
def test_ttl_accepted(ttl: object, expected: int | None) -> None:
    result = validate(event(ttl=ttl))
    assert isinstance(result, NewEvent) and result.ttl == expected


@pytest.mark.parametrize(
    ("payload", "size"),
    [("QQ", 1), ("QQ==", 1), ("QUI", 2), ("QUI=", 2), ("QUJD", 3), ("+/+/", 3), ("A" * 86, 64), ("A" * 86 + "==", 64)],
)
def test_base64_accepted(payload: str, size: int) -> None:
    result = validate(event(encrypted_payload=payload))
    assert isinstance(result, NewEvent) and result.payload_size == size
    assert result.encrypted_payload == payload


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 63, 64, 1000])
def test_decoded_size_matches_decoding(size: int) -> None:
    encoded = base64.b64encode(b"\x07" * size).decode()
    assert b64_decoded_size(encoded) == size
    assert b64_decoded_size(encoded.rstrip("=")) == size


INVALID = "INVALID_EVENT"
_ERRORS: list[tuple[str, Any, str]] = [
    ("not an object", [event()], "Invalid event structure"),
    ("null payload", None, "Invalid event structure"),
    ("string payload", "event", "Invalid event structure"),
    ("seq missing", event(device_seq=DROP), "Device sequence must be an integer"),
    ("seq null", event(device_seq=None), "Device sequence must be an integer"),
    ("seq string", event(device_seq="42"), "Device sequence must be an integer"),
    ("seq true", event(device_seq=True), "Device sequence must be an integer"),
    ("seq fraction", event(device_seq=4.5), "Device sequence must be an integer"),
    ("seq zero", event(device_seq=0), "Device sequence must be >= 1"),
    ("seq negative", event(device_seq=-3.0), "Device sequence must be >= 1"),
    ("seq 2^53", event(device_seq=2**53), "Device sequence too large"),
    ("seq 1e300", event(device_seq=1e300), "Device sequence too large"),
    ("seq wins over everything", {"device_seq": False, "event_id": 1}, "Device sequence must be an integer"),
]


@pytest.mark.parametrize(("case", "payload", "error"), _ERRORS, ids=[c[0] for c in _ERRORS])
def test_error_frames(case: str, payload: Any, error: str) -> None:
    result = validate(payload)
    assert result == ErrorFrame(INVALID, error)
    assert result.frame() == {"type": "error", "payload": {"code": "INVALID_EVENT", "error": error}}


BAD_ID = "not-a-uuid"
_REJECTIONS: list[tuple[str, dict[str, Any], str, str, bool]] = [
    # (case, payload, code, error, carries event_id)
    ("event_id missing", event(event_id=DROP), INVALID, "Event ID is required", False),
    ("event_id empty", event(event_id=""), INVALID, "Event ID is required", False),
    ("event_id number", event(event_id=7), INVALID, "Event ID is required", False),
    ("event_id v4", event(event_id=D), INVALID, "Invalid event ID format (must be UUIDv7)", False),
    (
        "event_id garbage",
        event(event_id=BAD_ID, stream_id="bad id"),
        INVALID,
        "Invalid event ID format (must be UUIDv7)",
        False,
    ),
    ("user_id short", event(user_id=U[:-1]), INVALID, "Invalid user ID format (must be Ed25519 public key hex)", True),
    (
        "user_id number",
        event(user_id=5, device_id=DROP),
        INVALID,
        "Invalid user ID format (must be Ed25519 public key hex)",
        True,
    ),
    (
        "user_id padded",
        event(user_id=f" {U} "),
        INVALID,
        "Invalid user ID format (must be Ed25519 public key hex)",
        True,
    ),
    ("device_id missing", event(device_id=DROP, stream_id=DROP), INVALID, "Device ID is required", True),
    ("device_id empty", event(device_id=""), INVALID, "Device ID is required", True),
    ("device_id v7", event(device_id=EVENT_ID), INVALID, "Invalid device ID format (must be UUIDv4)", True),
    ("stream_id missing", event(stream_id=DROP, type=DROP), INVALID, "Stream ID is required", True),
    ("stream_id empty", event(stream_id=""), INVALID, "Stream ID is required", True),
    ("stream_id list", event(stream_id=["a"]), INVALID, "Stream ID is required", True),
    ("stream_id long", event(stream_id="a" * 256 + " "), INVALID, "Stream ID is too long", True),
    ("stream_id chars", event(stream_id="clip board"), INVALID, "Invalid stream ID format", True),
    ("stream_id unicode", event(stream_id="clipé"), INVALID, "Invalid stream ID format", True),
    ("stream_id newline", event(stream_id="clip\n"), INVALID, "Invalid stream ID format", True),
    ("type missing", event(type=DROP), INVALID, "Event type is required", True),
    ("type empty", event(type="", encrypted_payload=DROP), INVALID, "Event type is required", True),
    ("type long", event(type="t" * 65), INVALID, "Event type is too long", True),
    ("type chars", event(type="clipboard/text"), INVALID, "Invalid event type format", True),
    ("payload missing", event(encrypted_payload=DROP), INVALID, "Encrypted payload is required", True),
    ("payload empty", event(encrypted_payload=""), INVALID, "Encrypted payload is required", True),
    ("payload bytes-ish", event(encrypted_payload=[1, 2]), INVALID, "Encrypted payload is required", True),
    (
        "payload whitespace",
        event(encrypted_payload="QUJD QUJD"),
        INVALID,
        "Invalid encrypted payload (must be base64)",
        True,
    ),
    ("payload newline", event(encrypted_payload="QUJD\n"), INVALID, "Invalid encrypted payload (must be base64)", True),
    ("payload urlsafe", event(encrypted_payload="-_-_"), INVALID, "Invalid encrypted payload (must be base64)", True),
    (
        "payload inner =",
        event(encrypted_payload="QQ==QUJD"),
        INVALID,
        "Invalid encrypted payload (must be base64)",
        True,
    ),
    ("payload len%4==1", event(encrypted_payload="QUJDR"), INVALID, "Invalid encrypted payload (must be base64)", True),
    ("payload bad pad", event(encrypted_payload="QUI=="), INVALID, "Invalid encrypted payload (must be base64)", True),
    ("payload 3 pads", event(encrypted_payload="Q==="), INVALID, "Invalid encrypted payload (must be base64)", True),
    ("payload only pad", event(encrypted_payload="=="), INVALID, "Invalid encrypted payload (must be base64)", True),
    ("payload non-ascii", event(encrypted_payload="QUJé"), INVALID, "Invalid encrypted payload (must be base64)", True),
    (
        "payload too large",
        event(encrypted_payload="A" * 88, ttl="bad"),
        "PAYLOAD_TOO_LARGE",
        "Payload too large (max 64 bytes)",
        True,
    ),
    ("ttl string", event(ttl="1760000000000"), INVALID, "Invalid event TTL", True),
    ("ttl bool", event(ttl=True), INVALID, "Invalid event TTL", True),
    ("ttl false", event(ttl=False), INVALID, "Invalid event TTL", True),
    ("ttl fraction", event(ttl=NOW + 0.5), INVALID, "Invalid event TTL", True),
    ("ttl negative", event(ttl=-1), INVALID, "Invalid event TTL", True),
    ("ttl object", event(ttl={"at": NOW}), INVALID, "Invalid event TTL", True),
    ("ttl beyond 2^53", event(ttl=2**53), INVALID, "Invalid event TTL", True),
    (
        "ttl expired",
        event(ttl=NOW - SKEW - 1, user_id="ab" * 32),
        "EVENT_EXPIRED",
        "Event TTL has expired (considering clock skew tolerance)",
        True,
    ),
    ("ttl 1", event(ttl=1), "EVENT_EXPIRED", "Event TTL has expired (considering clock skew tolerance)", True),
    (
        "user mismatch",
        event(user_id="ab" * 32, device_id="6ba7b810-9dad-41d1-80b4-00c04fd430c8"),
        "USER_MISMATCH",
        "Event user_id mismatch",
        True,
    ),
    (
        "device mismatch",
        event(device_id="6ba7b810-9dad-41d1-80b4-00c04fd430c8"),
        "DEVICE_MISMATCH",
        "Event device_id mismatch",
        True,
    ),
]


@pytest.mark.parametrize(("case", "payload", "code", "error", "with_id"), _REJECTIONS, ids=[r[0] for r in _REJECTIONS])
def test_rejections_in_order(case: str, payload: dict[str, Any], code: str, error: str, with_id: bool) -> None:
    result = validate(payload)
    event_id = EVENT_ID if with_id else None
    assert result == Rejection(device_seq=42, event_id=event_id, code=code, error=error)
    ack_payload: dict[str, Any] = {"device_seq": 42}
    if with_id:
        ack_payload["event_id"] = EVENT_ID
    ack_payload.update(status="rejected", code=code, error=error)
    assert result.ack() == {"type": "ack", "payload": ack_payload}


def test_rejection_carries_lowercased_event_id() -> None:
    result = validate(event(event_id=EVENT_ID.upper(), stream_id=""))
    assert isinstance(result, Rejection) and result.event_id == EVENT_ID
    assert list(result.ack()["payload"]) == ["device_seq", "event_id", "status", "code", "error"]


def test_rejection_ack_without_event_id_matches_spec_example() -> None:
    ack = Rejection(device_seq=43, event_id=None, code="INVALID_EVENT", error="Invalid stream ID format").ack()
    assert ack == {
        "type": "ack",
        "payload": {
            "device_seq": 43,
            "status": "rejected",
            "code": "INVALID_EVENT",
            "error": "Invalid stream ID format",
        },
    }


def test_payload_limit_is_the_decoded_size() -> None:
    ok = base64.b64encode(b"x" * MAX_PAYLOAD).decode()
    over = base64.b64encode(b"x" * (MAX_PAYLOAD + 1)).decode()
    assert isinstance(validate(event(encrypted_payload=ok)), NewEvent)
    assert validate(event(encrypted_payload=over)) == Rejection(
        42, EVENT_ID, "PAYLOAD_TOO_LARGE", f"Payload too large (max {MAX_PAYLOAD} bytes)"
    )


def test_ttl_within_skew_accepted_just_beyond_rejected() -> None:
    assert isinstance(validate(event(ttl=NOW - SKEW)), NewEvent)
    result = validate(event(ttl=NOW - SKEW - 1))
    assert isinstance(result, Rejection) and result.code == "EVENT_EXPIRED"


def test_ack_stored() -> None:
    assert ack_stored(42, EVENT_ID, "stored") == {
        "type": "ack",
        "payload": {"device_seq": 42, "event_id": EVENT_ID, "status": "stored"},
    }
    assert ack_stored(7, EVENT_ID, "duplicate")["payload"]["status"] == "duplicate"


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner), max_leaves=8
)
_keys = st.sampled_from(
    ["event_id", "user_id", "device_id", "device_seq", "stream_id", "type", "encrypted_payload", "ttl", "other"]
)
_interesting = {
    "event_id": st.sampled_from([EVENT_ID, EVENT_ID.upper(), D]),
    "user_id": st.sampled_from([U, K, "", None]),
    "device_id": st.sampled_from([D, D.upper(), EVENT_ID]),
    "device_seq": st.sampled_from([1, 5.0, 0, 2**53, True]) | st.integers() | st.floats(),
    "stream_id": st.from_regex(r"[A-Za-z0-9:_-]{1,300}", fullmatch=True),
    "type": st.from_regex(r"[A-Za-z0-9:_-]{1,70}", fullmatch=True),
    "encrypted_payload": st.from_regex(r"[A-Za-z0-9+/=]{0,100}", fullmatch=True),
    "ttl": st.sampled_from([None, 0, NOW, 1, -1, 2**60]) | st.floats(),
}


@given(st.one_of(_values, st.dictionaries(_keys, _values), st.fixed_dictionaries({}, optional=_interesting)))
def test_validate_event_never_raises(payload: Any) -> None:
    result = validate(payload)
    assert isinstance(result, NewEvent | Rejection | ErrorFrame)
    if isinstance(result, Rejection):
        assert result.ack()["payload"]["status"] == "rejected"
