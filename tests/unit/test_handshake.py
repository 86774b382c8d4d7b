"""Handshake parsing, signatures and key schedule against the §3.9 vectors (protocol.md §2-3)."""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
import unicodedata
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from pocketbridge.errors import INVALID_SIGNATURE, ProtocolClose, missing_or_invalid
from pocketbridge.protocol import (
    ClientAuth,
    ClientHello,
    Message,
    ServerHandshake,
    ServerIdentity,
    dedupe_device_name,
    digest_c,
    digest_s,
    handshake_body,
    parse_client_auth,
    parse_client_hello,
    sanitize_device_name,
)

# --- §3.9 vectors ------------------------------------------------------------------------------------
SERVER_SEED = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
SERVER_IDENTITY_PUB = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
CLIENT_SEED = bytes.fromhex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")
USER_ID = "29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7"
CLIENT_EPH_PRIV = b"\x11" * 32
CLIENT_EPH_PUB = (
    "040217e617f0b6443928278f96999e69a23a4f2c152bdf6d6cdf66e5b80282d4ed"
    "194a7debcb97712d2dda3ca85aa8765a56f45fc758599652f2897c65306e5794"
)
SERVER_EPH_PRIV = b"\x22" * 32
SERVER_EPH_PUB = (
    "04d65a93977caa3d1b081852ff57a79e465f1660577304baead505dd3a48589cf3"
    "50185e895372df6221ea3a137557e473fddb6755f05bd507c3c533fce9c91285"
)
NONCE_C, NONCE_S = "aa" * 32, "bb" * 32
DEVICE_ID = "550e8400-e29b-41d4-a716-446655440000"
ECDH_SHARED = "ccfc261f58193c98ca4ad4a53bbac6f0ee29bc4d48438090446908622ca79af6"
SALT = "2e0d7fe0175f5b4a799673df1034dab7025db9ae8ee56b89af1c72ed3ff05abc"
PRK = "d268e0c9888993bd736fe3a9a74fc073b16b5f0b1b1d6cf32acffec983ccd40a"
CLIENT_KEY = "fb3cdc17b100fd28419b43f8750984f920fb7c8f0163ff5e90947366dab23390"
SERVER_KEY = "a6b79d41b332270f284c2bbc038f2b0d7eb0b807bda8f3f1843d19b3d8a4aaed"
WEB_KEY = "5829ecbc5ca36709a43d5955848e8011fbebbf05d28d5ffe208ed4ed4fde7195"
DIGEST_S = "405abba87e830339cea2fedaabc6dd79bfff9cb798bec3f4c8122beaf19d66ad"
SERVER_SIGNATURE = (
    "aec0bb00f4f52f15e7679f2d85e5f503bd33e78c0f4f6cffa82b94538b49a13d"
    "ad6e425efe25b5e92233542e86edf36204553d17fe36239c7f81cd9cc5cb1a0d"
)
DIGEST_C = "3b96feb6c4f8075500c149605108a1bac5d2efa3385e0dfe3c4e7fbf891b9b8c"
CLIENT_SIGNATURE = (
    "7ee8807964413a84eb37ec544635a9b60cd9890684bd6594c8f9fd0d12311239"
    "a1377161ea79396d9f23a6b5c5bc23f6950693643ee92a5085104bd35740660f"
)
TOKEN_KEY = "4e506a032feba260493a41098d0abbb0f204bc0564f551a2dd6136f664deab7c"


def message(type_: str, body: dict[str, Any], *, wrapped: bool) -> Message:
    """A handshake message in wrapped or flat form (§3.2)."""
    raw = {"type": type_, "payload": {"type": type_, **body}} if wrapped else {"type": type_, **body}
    return Message(type=type_, payload=raw.get("payload"), raw=raw)


def hello_body(**overrides: Any) -> dict[str, Any]:
    return {"client_ephemeral_pub": CLIENT_EPH_PUB, "nonce_c": NONCE_C, **overrides}


def auth_body(**overrides: Any) -> dict[str, Any]:
    body = {"user_id": USER_ID, "device_id": DEVICE_ID, "client_signature": CLIENT_SIGNATURE, "nonce_c2": "cc" * 32}
    return {**body, **overrides}


def vector_handshake(nonce_c: str = NONCE_C) -> ServerHandshake:
    hello = ClientHello(client_ephemeral_pub=CLIENT_EPH_PUB, nonce_c=nonce_c)
    identity = ServerIdentity.from_seed(SERVER_SEED)
    return ServerHandshake(identity, hello, ephemeral_private=SERVER_EPH_PRIV, nonce_s=NONCE_S)


def client_sign(user_id: str, device_id: str, nonce_c: str) -> str:
    """The client side: sign digest_c with the §3.9 client seed."""
    digest = digest_c(user_id, device_id, nonce_c, NONCE_S, SERVER_EPH_PUB)
    return Ed25519PrivateKey.from_private_bytes(CLIENT_SEED).sign(digest).hex()


def close_of(exc: pytest.ExceptionInfo[ProtocolClose]) -> tuple[int, str]:
    return exc.value.close.code, exc.value.close.reason


# --- vectors -------------------------------------------------------------------------------------------
def test_public_keys_derive_from_seeds() -> None:
    assert ServerIdentity.from_seed(SERVER_SEED).public_hex == SERVER_IDENTITY_PUB
    assert Ed25519PrivateKey.from_private_bytes(CLIENT_SEED).public_key().public_bytes_raw().hex() == USER_ID
    client_eph = ec.derive_private_key(int.from_bytes(CLIENT_EPH_PRIV, "big"), ec.SECP256R1())
    assert client_eph.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint).hex() == CLIENT_EPH_PUB
    assert vector_handshake().server_ephemeral_pub == SERVER_EPH_PUB


def test_ecdh_salt_prk_vectors() -> None:
    client_eph = ec.derive_private_key(int.from_bytes(CLIENT_EPH_PRIV, "big"), ec.SECP256R1())
    server_pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(SERVER_EPH_PUB))
    shared = client_eph.exchange(ec.ECDH(), server_pub)
    assert shared.hex() == ECDH_SHARED
    salt = hashlib.sha256(bytes.fromhex(CLIENT_EPH_PUB) + bytes.fromhex(SERVER_EPH_PUB)).digest()
    assert salt.hex() == SALT
    prk = hmac.new(salt, shared, hashlib.sha256).digest()
    assert prk.hex() == PRK
    assert hmac.new(prk, b"pocketbridge_client_to_server_v1\x01", hashlib.sha256).hexdigest() == CLIENT_KEY


def test_session_keys_match_vectors() -> None:
    keys = vector_handshake().session_keys()
    assert keys.client_to_server.hex() == CLIENT_KEY
    assert keys.server_to_client.hex() == SERVER_KEY
    assert keys.web_session.hex() == WEB_KEY
    assert CLIENT_KEY not in repr(keys)


def test_digest_s_and_server_hello_reproduce_exactly() -> None:
    assert digest_s(SERVER_IDENTITY_PUB, SERVER_EPH_PUB, NONCE_C, NONCE_S).hex() == DIGEST_S
    assert vector_handshake().server_hello() == {
        "type": "server_hello",
        "payload": {
            "type": "server_hello",
            "server_ephemeral_pub": SERVER_EPH_PUB,
            "server_identity_pub": SERVER_IDENTITY_PUB,
            "server_signature": SERVER_SIGNATURE,
            "nonce_s": NONCE_S,
        },
    }


def test_digest_c_and_client_signature() -> None:
    assert digest_c(USER_ID, DEVICE_ID, NONCE_C, NONCE_S, SERVER_EPH_PUB).hex() == DIGEST_C
    assert client_sign(USER_ID, DEVICE_ID, NONCE_C) == CLIENT_SIGNATURE
    public = Ed25519PrivateKey.from_private_bytes(CLIENT_SEED).public_key()
    public.verify(bytes.fromhex(CLIENT_SIGNATURE), bytes.fromhex(DIGEST_C))  # raises if invalid


def test_token_key_and_fingerprint() -> None:
    identity = ServerIdentity.from_seed(SERVER_SEED)
    assert identity.token_key().hex() == TOKEN_KEY
    assert identity.seed == SERVER_SEED
    expected = hashlib.sha256(bytes.fromhex(SERVER_IDENTITY_PUB)).hexdigest()[:32]
    assert identity.fingerprint().replace(":", "") == expected
    assert re.fullmatch(r"[0-9a-f]{4}(:[0-9a-f]{4}){7}", identity.fingerprint())
    assert SERVER_SEED.hex() not in repr(identity)


def test_identity_generate_and_bad_seed() -> None:
    identity = ServerIdentity.generate()
    assert ServerIdentity.from_seed(identity.seed).public_hex == identity.public_hex
    assert re.fullmatch(r"[0-9a-f]{64}", identity.public_hex)
    with pytest.raises(ValueError):
        ServerIdentity.from_seed(b"\x00" * 31)


def test_fresh_handshakes_use_fresh_keys_and_nonces() -> None:
    identity = ServerIdentity.from_seed(SERVER_SEED)
    hello = ClientHello(CLIENT_EPH_PUB, NONCE_C)
    first, second = ServerHandshake(identity, hello), ServerHandshake(identity, hello)
    assert first.nonce_s != second.nonce_s and re.fullmatch(r"[0-9a-f]{64}", first.nonce_s)
    assert first.server_ephemeral_pub != second.server_ephemeral_pub
    payload = first.server_hello()["payload"]
    signed = digest_s(SERVER_IDENTITY_PUB, payload["server_ephemeral_pub"], NONCE_C, payload["nonce_s"])
    Ed25519PrivateKey.from_private_bytes(SERVER_SEED).public_key().verify(
        bytes.fromhex(payload["server_signature"]), signed
    )


# --- full vector handshake -----------------------------------------------------------------------------
@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "flat"])
def test_vector_handshake_accepted(wrapped: bool) -> None:
    hello = parse_client_hello(message("client_hello", hello_body(), wrapped=wrapped))
    assert hello == ClientHello(CLIENT_EPH_PUB, NONCE_C)
    server = ServerHandshake(
        ServerIdentity.from_seed(SERVER_SEED), hello, ephemeral_private=SERVER_EPH_PRIV, nonce_s=NONCE_S
    )
    assert server.server_hello()["payload"]["server_signature"] == SERVER_SIGNATURE
    auth = parse_client_auth(message("client_auth", auth_body(), wrapped=wrapped))
    assert auth == ClientAuth(USER_ID, DEVICE_ID, CLIENT_SIGNATURE, "cc" * 32, None, None)
    server.verify(auth)


def test_ids_are_hashed_verbatim() -> None:
    user, device = USER_ID.upper(), DEVICE_ID.upper()
    signature = client_sign(user, device, NONCE_C)
    auth = parse_client_auth(
        message("client_auth", auth_body(user_id=user, device_id=device, client_signature=signature), wrapped=True)
    )
    assert (auth.user_id, auth.device_id) == (user, device)
    vector_handshake().verify(auth)


@pytest.mark.parametrize(("signed", "sent"), [(NONCE_C.upper(), NONCE_C), (NONCE_C, NONCE_C.upper())])
def test_nonce_case_mismatch_fails(signed: str, sent: str) -> None:
    auth = parse_client_auth(
        message("client_auth", auth_body(client_signature=client_sign(USER_ID, DEVICE_ID, signed)), wrapped=True)
    )
    with pytest.raises(ProtocolClose) as exc:
        vector_handshake(nonce_c=sent).verify(auth)
    assert exc.value.close == INVALID_SIGNATURE
    assert close_of(exc) == (1008, "Invalid client signature")


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_signature": "00" * 64},
        {"client_signature": CLIENT_SIGNATURE[:-2] + "0e"},
        {"user_id": "ff" * 32},  # not the signer
        {"user_id": (2).to_bytes(32, "little").hex()},  # not a valid Ed25519 key
        {"device_id": "550e8400-e29b-41d4-a716-446655440001"},
    ],
)
def test_bad_signature_fails(overrides: dict[str, str]) -> None:
    auth = parse_client_auth(message("client_auth", auth_body(**overrides), wrapped=False))
    with pytest.raises(ProtocolClose) as exc:
        vector_handshake().verify(auth)
    assert exc.value.close == INVALID_SIGNATURE


# --- body form and field failures ----------------------------------------------------------------------
def test_handshake_body_rule() -> None:
    wrapped = message("client_hello", {"nonce_c": "x"}, wrapped=True)
    assert handshake_body(wrapped) == {"type": "client_hello", "nonce_c": "x"}
    flat = message("client_hello", {"nonce_c": "x"}, wrapped=False)
    assert handshake_body(flat) is flat.raw
    mismatched = Message(
        "client_hello",
        {"type": "client_auth", "nonce_c": "y"},
        {"type": "client_hello", "payload": {"type": "client_auth", "nonce_c": "y"}, "nonce_c": "x"},
    )
    assert handshake_body(mismatched)["nonce_c"] == "x"
    untyped = Message("client_hello", {"nonce_c": "y"}, {"type": "client_hello", "payload": {"nonce_c": "y"}})
    assert handshake_body(untyped) is untyped.raw


def test_wrapped_payload_without_type_reads_top_level() -> None:
    raw = {"type": "client_hello", "payload": hello_body()}
    with pytest.raises(ProtocolClose) as exc:
        parse_client_hello(Message("client_hello", raw["payload"], raw))
    assert exc.value.close == missing_or_invalid("client_ephemeral_pub")


OFF_CURVE = "04" + "00" * 64
_HELLO_FAILURES = [
    ({"client_ephemeral_pub": None}, "client_ephemeral_pub"),
    ({"client_ephemeral_pub": 4}, "client_ephemeral_pub"),
    ({"client_ephemeral_pub": CLIENT_EPH_PUB[:-2]}, "client_ephemeral_pub"),
    ({"client_ephemeral_pub": CLIENT_EPH_PUB + "00"}, "client_ephemeral_pub"),
    ({"client_ephemeral_pub": "05" + CLIENT_EPH_PUB[2:]}, "client_ephemeral_pub"),
    ({"client_ephemeral_pub": CLIENT_EPH_PUB[:-1] + "g"}, "client_ephemeral_pub"),
    ({"client_ephemeral_pub": OFF_CURVE}, "client_ephemeral_pub"),
    ({"client_ephemeral_pub": CLIENT_EPH_PUB[:-2] + "95"}, "client_ephemeral_pub"),  # y off by one
    ({"client_ephemeral_pub": OFF_CURVE, "nonce_c": None}, "client_ephemeral_pub"),  # first field wins
    ({"nonce_c": None}, "nonce_c"),
    ({"nonce_c": "aa" * 31}, "nonce_c"),
    ({"nonce_c": "aa" * 32 + "\n"}, "nonce_c"),
    ({"nonce_c": "zz" * 32}, "nonce_c"),
    ({"nonce_c": 123}, "nonce_c"),
]


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "flat"])
@pytest.mark.parametrize(("overrides", "field"), _HELLO_FAILURES)
def test_client_hello_failures(overrides: dict[str, Any], field: str, wrapped: bool) -> None:
    body = {k: v for k, v in hello_body(**overrides).items() if v is not None}
    with pytest.raises(ProtocolClose) as exc:
        parse_client_hello(message("client_hello", body, wrapped=wrapped))
    assert close_of(exc) == (1008, f"Missing or invalid {field}")


def test_client_hello_keeps_case() -> None:
    hello = parse_client_hello(
        message(
            "client_hello", hello_body(client_ephemeral_pub=CLIENT_EPH_PUB.upper(), nonce_c="Aa" * 32), wrapped=False
        )
    )
    assert hello == ClientHello(CLIENT_EPH_PUB.upper(), "Aa" * 32)


_AUTH_FAILURES = [
    ({"user_id": None}, "user_id"),
    ({"user_id": USER_ID[:-1]}, "user_id"),
    ({"user_id": USER_ID[:-1] + "x"}, "user_id"),
    ({"user_id": 5, "device_id": None, "client_signature": None, "nonce_c2": None}, "user_id"),
    ({"device_id": None}, "device_id"),
    ({"device_id": "550e8400e29b41d4a716446655440000"}, "device_id"),
    ({"device_id": "550e8400-e29b-11d4-a716-446655440000"}, "device_id"),  # v1
    ({"device_id": "550e8400-e29b-41d4-c716-446655440000"}, "device_id"),  # bad variant
    ({"device_id": "{550e8400-e29b-41d4-a716-446655440000}"}, "device_id"),
    ({"device_id": "01890a5d-ac96-774b-bcce-b302099a8057", "nonce_c2": None}, "device_id"),
    ({"client_signature": None}, "client_signature"),
    ({"client_signature": CLIENT_SIGNATURE[:-2]}, "client_signature"),
    ({"client_signature": ["x"]}, "client_signature"),
    ({"nonce_c2": None}, "nonce_c2"),
    ({"nonce_c2": "cc" * 33}, "nonce_c2"),
    ({"nonce_c2": "c" * 63 + "-"}, "nonce_c2"),
]


@pytest.mark.parametrize("wrapped", [True, False], ids=["wrapped", "flat"])
@pytest.mark.parametrize(("overrides", "field"), _AUTH_FAILURES)
def test_client_auth_failures_in_order(overrides: dict[str, Any], field: str, wrapped: bool) -> None:
    body = {k: v for k, v in auth_body(**overrides).items() if v is not None}
    with pytest.raises(ProtocolClose) as exc:
        parse_client_auth(message("client_auth", body, wrapped=wrapped))
    assert close_of(exc) == (1008, f"Missing or invalid {field}")


@pytest.mark.parametrize(
    ("extra", "name", "device_type"),
    [
        ({"device_name": "My Phone", "device_type": "mobile"}, "My Phone", "mobile"),
        ({"device_name": "  <b>Laptop</b>\x00 ", "device_type": "desktop"}, "bLaptop/b", "desktop"),
        ({"device_name": "", "device_type": "web"}, None, "web"),
        ({"device_name": "<>\t", "device_type": "Web"}, None, None),
        ({"device_name": 42, "device_type": "tablet"}, None, None),
        ({"device_name": ["x"], "device_type": ["mobile"]}, None, None),
        ({"device_name": None, "device_type": None}, None, None),
    ],
)
def test_client_auth_name_and_type_are_lenient(
    extra: dict[str, Any], name: str | None, device_type: str | None
) -> None:
    auth = parse_client_auth(message("client_auth", auth_body(**extra), wrapped=True))
    assert (auth.device_name, auth.device_type) == (name, device_type)


# --- device names (§3.6) -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Pixel 8", "Pixel 8"),
        ("  Pixel 8  ", "Pixel 8"),
        ("a" * 60, "a" * 50),
        ("b" * 49 + " c", "b" * 49),  # truncation leaves a trailing space, trimmed again
        (" " + "é" * 55, "é" * 50),  # code points, not bytes
        ("Pi\x00x\x1fel\x7f\u0085", "Pixel"),
        ("<script>alert(1)</script>", "scriptalert(1)/script"),
        ("Ph\ud800one", "Phone"),
        ("Phone \u200b", "Phone \u200b"),  # Cf is kept
        ("\n\t <> ", None),
        ("", None),
        (None, None),
        (12, None),
        (b"Phone", None),
    ],
)
def test_sanitize_device_name(raw: object, expected: str | None) -> None:
    assert sanitize_device_name(raw) == expected


@pytest.mark.parametrize(
    ("name", "taken", "expected"),
    [
        ("Phone", [], "Phone"),
        ("Phone", ["Laptop", "Phone (2)"], "Phone"),
        ("Phone", ["Phone"], "Phone (2)"),
        ("Phone", ["Phone", "Phone (2)", "Phone (3)"], "Phone (4)"),
        ("Phone (2)", ["Phone (2)"], "Phone (3)"),
        ("Phone (2)", ["Phone (2)", "Phone (3)"], "Phone (4)"),
        ("Phone (3)", ["Phone (3)"], "Phone (2)"),
        ("Phone (1)", ["Phone (1)"], "Phone (1) (2)"),
        ("Phone(2)", ["Phone(2)"], "Phone(2) (2)"),
        ("a" * 50, ["a" * 50], "a" * 46 + " (2)"),
        ("a" * 50, ["a" * 50] + [f"{'a' * 46} ({n})" for n in range(2, 10)], "a" * 45 + " (10)"),
        ("a" * 46 + " (2)", ["a" * 46 + " (2)"], "a" * 46 + " (3)"),
    ],
)
def test_dedupe_device_name(name: str, taken: list[str], expected: str) -> None:
    result = dedupe_device_name(name, taken)
    assert result == expected
    assert len(result) <= 50
    assert result == name or result not in taken


def _reference_sanitize(name: str) -> str | None:
    bidi = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}
    kept = "".join(
        ch for ch in name if ch not in "<>" and unicodedata.category(ch) not in ("Cc", "Cs") and ord(ch) not in bidi
    )
    return kept.strip()[:50].strip() or None


def test_sanitize_removes_every_cc_and_cs_code_point() -> None:
    dropped = "".join(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cs"))
    assert sanitize_device_name(f"A{dropped}<>B") == "AB"


@given(st.text(alphabet=st.characters(exclude_categories=[]), max_size=80))
def test_sanitize_matches_the_category_rule(name: str) -> None:
    assert sanitize_device_name(name) == _reference_sanitize(name)
