"""Replay request parameters and continuation tokens (protocol.md §6.1, §6.6)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pocketbridge.protocol import (
    Message,
    ReplayParams,
    ServerIdentity,
    make_token,
    parse_replay_request,
    read_token,
)

SERVER_SEED = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
U = "29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7"
D = "550e8400-e29b-41d4-a716-446655440000"
K_TOKEN = "4e506a032feba260493a41098d0abbb0f204bc0564f551a2dd6136f664deab7c"
J = (
    '{"v":1,"u":"29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7",'
    '"d":"550e8400-e29b-41d4-a716-446655440000","s":1234,"t":1760000000000}'
)
HMAC = "9866a81dade6c4ef0f477ad8ba31fb590c48d9284470cf92d891fad83ca27b2f"
TOKEN = (
    "eyJ2IjoxLCJ1IjoiMjlhY2JhZTE0MWJjY2FmMGIyMmUxYTk0ZDM0ZDBiYzczNjFlNTI2ZDBiZmUxMmM4OTc5NGJjOTMyMjk2NmRkNyIsImQi"
    "OiI1NTBlODQwMC1lMjliLTQxZDQtYTcxNi00NDY2NTU0NDAwMDAiLCJzIjoxMjM0LCJ0IjoxNzYwMDAwMDAwMDAwfQ"
    ".mGaoHa3mxO8PR3rYujH7WQxI2ShEcM-S2JH62Dyiey8"
)
ISSUED = 1_760_000_000_000
HOUR = 3_600_000
KEY = bytes.fromhex(K_TOKEN)


def read(token: Any, *, user_id: str = U, device_id: str = D, now_ms: int = ISSUED + 1000) -> int | None:
    return read_token(KEY, token, user_id=user_id, device_id=device_id, now_ms=now_ms, max_age_ms=HOUR)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(claims: bytes, key: bytes = KEY) -> str:
    return f"{b64u(claims)}.{b64u(hmac.new(key, claims, hashlib.sha256).digest())}"


# --- token vector -------------------------------------------------------------------------------------
def test_token_vector_reproduced_exactly() -> None:
    assert ServerIdentity.from_seed(SERVER_SEED).token_key().hex() == K_TOKEN
    assert hmac.new(KEY, J.encode(), hashlib.sha256).hexdigest() == HMAC
    assert make_token(KEY, U, D, 1234, ISSUED) == TOKEN
    claims, mac = TOKEN.split(".")
    assert base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)).decode() == J
    assert base64.urlsafe_b64decode(mac + "=").hex() == HMAC


def test_token_round_trip() -> None:
    assert read(TOKEN) == 1234
    assert read(make_token(KEY, U, D, 0, ISSUED)) == 0
    assert read(TOKEN, now_ms=ISSUED + HOUR) == 1234  # age == max is still valid
    assert read(TOKEN, now_ms=ISSUED - 5000) == 1234  # issued slightly in the future (another instance's clock)


def test_padded_token_parts_are_tolerated() -> None:
    claims, mac = TOKEN.split(".")
    padded = f"{claims}{'=' * (-len(claims) % 4)}.{mac}{'=' * (-len(mac) % 4)}"
    assert read(padded) == 1234
    assert read(f"{claims}===.{mac}") is None


def _flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


@pytest.mark.parametrize(
    "token",
    [
        _flip(TOKEN, 10),  # claims tampered
        _flip(TOKEN, len(TOKEN) - 3),  # mac tampered
        TOKEN.split(".")[0],  # no mac
        TOKEN + ".x",
        "." + TOKEN.split(".")[1],
        TOKEN.replace("-", "+"),  # standard alphabet is not base64url
        TOKEN + "A",  # mac length % 4 == 1
        TOKEN[:-1] + "é",
        "",
        ".",
        "garbage",
        "eyJ2IjoxfQ.!!!",
        signed(J.encode(), key=b"other key"),
        make_token(b"\x00" * 32, U, D, 1234, ISSUED),
    ],
)
def test_invalid_tokens_are_ignored(token: str) -> None:
    assert read(token) is None


def test_token_bound_to_user_device_and_age() -> None:
    assert read(TOKEN, user_id="ab" * 32) is None
    assert read(TOKEN, device_id="6ba7b810-9dad-41d1-80b4-00c04fd430c8") is None
    assert read(TOKEN, user_id=U.upper()) is None  # canonical forms only
    assert read(TOKEN, now_ms=ISSUED + HOUR + 1) is None


@pytest.mark.parametrize(
    "claims",
    [
        {"v": 2, "u": U, "d": D, "s": 1, "t": ISSUED},
        {"v": True, "u": U, "d": D, "s": 1, "t": ISSUED},
        {"v": 1.0, "u": U, "d": D, "s": 1, "t": ISSUED},
        {"v": 1, "u": U, "d": D, "s": -1, "t": ISSUED},
        {"v": 1, "u": U, "d": D, "s": True, "t": ISSUED},
        {"v": 1, "u": U, "d": D, "s": "1", "t": ISSUED},
        {"v": 1, "u": U, "d": D, "s": 1.5, "t": ISSUED},
        {"v": 1, "u": U, "d": D, "s": 1},
        {"v": 1, "u": U, "d": D, "s": 1, "t": "now"},
        {"u": U, "d": D, "s": 1, "t": ISSUED},
        [1, U, D, 1, ISSUED],
    ],
)
def test_correctly_signed_but_malformed_claims(claims: Any) -> None:
    assert read(signed(json.dumps(claims).encode())) is None


def test_correctly_signed_non_json_claims() -> None:
    assert read(signed(b"\xff\x00not json")) is None
    assert read(signed(b"[" * 5000)) is None


def test_read_token_never_raises_on_non_strings() -> None:
    for token in (None, 5, b"abc.def", ["a", "b"]):
        assert read(token) is None


@given(st.text(max_size=200))
def test_read_token_never_raises(token: str) -> None:
    assert read(token) is None


# --- replay_request parameters ------------------------------------------------------------------------
def request(raw: dict[str, Any]) -> ReplayParams:
    raw = {"type": "replay_request", **raw}
    return parse_replay_request(
        Message("replay_request", raw.get("payload"), raw), default_page_size=100, max_page_size=1000
    )


def test_defaults() -> None:
    assert request({}) == ReplayParams(limit=100, continuation_token=None, last_ack_device_seq=None)
    assert request({"payload": None}) == request({"payload": "x"}) == request({})


def test_parameters_from_payload() -> None:
    params = request(
        {"payload": {"type": "replay_request", "last_ack_device_seq": 42, "limit": 50, "continuation_token": TOKEN}}
    )
    assert params == ReplayParams(limit=50, continuation_token=TOKEN, last_ack_device_seq=42)


def test_parameters_from_top_level() -> None:
    params = request({"last_ack_device_seq": 42, "limit": 100, "continuation_token": TOKEN})
    assert params == ReplayParams(limit=100, continuation_token=TOKEN, last_ack_device_seq=42)


def test_payload_wins_per_parameter_and_null_falls_back() -> None:
    params = request(
        {
            "payload": {"limit": 7, "continuation_token": None},
            "limit": 9,
            "continuation_token": TOKEN,
            "last_ack_device_seq": 3,
        }
    )
    assert params == ReplayParams(limit=7, continuation_token=TOKEN, last_ack_device_seq=3)


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (1, 1),
        (1000, 1000),
        (1001, 1000),
        (10**12, 1000),
        (0, 1),
        (-5, 1),
        (50.0, 50),
        (50.5, 100),
        ("50", 100),
        (True, 100),
        (None, 100),
        ([50], 100),
        (float("inf"), 100),
    ],
)
def test_limit_clamped_or_defaulted(limit: Any, expected: int) -> None:
    assert request({"payload": {"limit": limit}}).limit == expected
    assert request({"limit": limit}).limit == expected


@pytest.mark.parametrize(
    ("token", "expected"),
    [("abc", "abc"), ("x" * 1024, "x" * 1024), ("x" * 1025, None), ("", None), (123, None), ({"t": 1}, None)],
)
def test_continuation_token_rules(token: Any, expected: str | None) -> None:
    assert request({"payload": {"continuation_token": token}}).continuation_token == expected


@pytest.mark.parametrize(
    ("value", "expected"), [(42, 42), (0, 0), (42.0, 42), (True, None), ("42", None), (4.5, None), (None, None)]
)
def test_last_ack_device_seq_echoed_only_if_number(value: Any, expected: int | None) -> None:
    result = request({"payload": {"last_ack_device_seq": value}}).last_ack_device_seq
    assert result == expected and (result is None or type(result) is int)
