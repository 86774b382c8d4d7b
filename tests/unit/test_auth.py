"""HTTP authentication against the §10.2 vectors: PB1 signed requests, bearer JWTs, admin key, request ids."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pocketbridge.protocol.auth import (
    EMPTY_BODY_SHA256,
    JwtClaims,
    PB1Headers,
    admin_key_matches,
    bearer_token,
    issue_jwt,
    parse_pb1_headers,
    pb1_string,
    presented_admin_key,
    request_id,
    sign_pb1,
    timestamp_ok,
    verify_jwt,
    verify_pb1,
)
from pocketbridge.protocol.handshake import ServerIdentity

# --- §3.9 / §10.2 vectors ----------------------------------------------------------------------------
SERVER_SEED = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
SERVER_IDENTITY_PUB = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
CLIENT_SEED = bytes.fromhex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")
USER_ID = "29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7"
DEVICE_ID = "550e8400-e29b-41d4-a716-446655440000"
TS = "1760000000000"
NOW_MS = 1760000000000
SKEW_MS = 300_000

RENAME_PATH = f"/api/devices/{DEVICE_ID}/rename"
RENAME_BODY = b'{"device_name":"Work laptop"}'
RENAME_BODY_HASH = "4954fdc2629579dbe10ef9d49b34665a0dc510a74fc1145ca9d1130309e612be"

PB1_VECTORS = [  # method, path with query, body, signature
    (
        "GET",
        "/api/devices",
        b"",
        "18a4ddd9ce5b9ac4ec6abe719e8b54eef9ed30eaa8c293433380b91cde7f427afb5c1820464323f05b9aeb2ca0623cfe5fda15f716ee92043f0c3ddf05038404",
    ),
    (
        "POST",
        RENAME_PATH,
        RENAME_BODY,
        "212a6e1023ce849484d81cd62b694c19deba06e61432dc5ef0c92f04f4ea8718c2be6916237de957e8a1820f38c6743ad7540e89d2b9a03f4ef3dcfa6075a008",
    ),
    (
        "GET",
        "/api/events/files?limit=10&offset=0",
        b"",
        "32835302ad2ef01fdca377b103decce5d47ed98d370c93e7d06bf5af67f25e6682c005466a3fafbe49b7d93ac83c1e71e12206a18523d50576408f0eab419501",
    ),
]

JWT_HEADER_B64U = "eyJhbGciOiJFZERTQSIsInR5cCI6IkpXVCJ9"
JWT_CLAIMS_JSON = (
    '{"iss":"pocketbridge","sub":"550e8400-e29b-41d4-a716-446655440000",'
    '"user_id":"29acbae141bccaf0b22e1a94d34d0bc7361e526d0bfe12c89794bc9322966dd7",'
    '"iat":1760000000,"exp":1760003600,"jti":"00112233445566778899aabbccddeeff"}'
)
JWT_SIGNATURE_B64U = "JInOxEMPh8VQb-VhhZ14NWpeJLtoA1nf6fCr4OhonndUPiRAk3iDR3LjY5o71dHYixz3Nypt4M0m89idT9KrAg"
JWT_IAT, JWT_EXP, JWT_JTI = 1760000000, 1760003600, "00112233445566778899aabbccddeeff"
JWT_NOW, JWT_SKEW = 1760000001, 300

IDENTITY = ServerIdentity.from_seed(SERVER_SEED)


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: Any, claims: Any, *, key: ServerIdentity = IDENTITY) -> str:
    """A token with arbitrary header and claims (objects → compact JSON; bytes as given), signed by ``key``."""
    parts = [h if isinstance(h, bytes) else json.dumps(h, separators=(",", ":")).encode() for h in (header, claims)]
    signing_input = b64u(parts[0]) + "." + b64u(parts[1])
    return signing_input + "." + b64u(key.sign(signing_input.encode("ascii")))


def vector_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = json.loads(JWT_CLAIMS_JSON)
    claims.update(changes)
    return claims


def verify(token: str, *, now_s: int = JWT_NOW, public_hex: str = SERVER_IDENTITY_PUB) -> JwtClaims | None:
    return verify_jwt(public_hex, token, now_s=now_s, skew_s=JWT_SKEW)


def pb1_headers(signature: str, *, device_id: str = DEVICE_ID, timestamp: str = TS) -> PB1Headers:
    headers = parse_pb1_headers(device_id, timestamp, signature)
    assert headers is not None
    return headers


# --- PB1 vectors ---------------------------------------------------------------------------------------
def test_client_key_is_the_user_id() -> None:
    public = Ed25519PrivateKey.from_private_bytes(CLIENT_SEED).public_key().public_bytes_raw()
    assert public.hex() == USER_ID


def test_empty_body_hash() -> None:
    assert hashlib.sha256(b"").hexdigest() == EMPTY_BODY_SHA256
    assert EMPTY_BODY_SHA256 == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_signing_string_of_the_get_vector() -> None:
    expected = (
        b"PB1\nGET\n/api/devices\n1760000000000\n550e8400-e29b-41d4-a716-446655440000\n"
        b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert pb1_string("GET", "/api/devices", TS, DEVICE_ID, b"") == expected
    assert pb1_string("get", "/api/devices", TS, DEVICE_ID, b"") == expected  # method upper-cased


def test_signing_string_of_the_rename_vector() -> None:
    assert len(RENAME_BODY) == 29
    assert hashlib.sha256(RENAME_BODY).hexdigest() == RENAME_BODY_HASH
    expected = f"PB1\nPOST\n{RENAME_PATH}\n{TS}\n{DEVICE_ID}\n{RENAME_BODY_HASH}".encode()
    assert pb1_string("POST", RENAME_PATH, TS, DEVICE_ID, RENAME_BODY) == expected


def test_signing_string_keeps_the_query_verbatim() -> None:
    path = "/api/events/files?limit=10&offset=0"
    assert pb1_string("GET", path, TS, DEVICE_ID, b"") == f"PB1\nGET\n{path}\n{TS}\n{DEVICE_ID}\n{EMPTY_BODY_SHA256}".encode()
    encoded = "/api/x%2Fy?a=%41"  # neither decoded nor normalised
    assert encoded.encode() in pb1_string("GET", encoded, TS, DEVICE_ID, b"")


@pytest.mark.parametrize(("method", "path", "body", "signature"), PB1_VECTORS)
def test_pb1_vectors_reproduce_and_verify(method: str, path: str, body: bytes, signature: str) -> None:
    assert sign_pb1(CLIENT_SEED, method, path, TS, DEVICE_ID, body) == signature
    assert verify_pb1(USER_ID, pb1_headers(signature), method, path, body)
    assert verify_pb1(USER_ID.upper(), pb1_headers(signature.upper()), method.lower(), path, body)


@pytest.mark.parametrize(("method", "path", "body", "signature"), PB1_VECTORS)
def test_pb1_modifications_fail(method: str, path: str, body: bytes, signature: str) -> None:
    headers = pb1_headers(signature)
    other_method = "DELETE" if method == "GET" else "GET"
    assert not verify_pb1(USER_ID, headers, other_method, path, body)
    assert not verify_pb1(USER_ID, headers, method, path + "/", body)
    assert not verify_pb1(USER_ID, headers, method, path.replace("/api/", "/api/v1/"), body)
    assert not verify_pb1(USER_ID, headers, method, path + ("&x=1" if "?" in path else "?x=1"), body)
    assert not verify_pb1(USER_ID, headers, method, path, body + b" ")
    assert not verify_pb1(USER_ID, pb1_headers(signature, timestamp="1760000000001"), method, path, body)
    other_device = "550e8400-e29b-41d4-a716-446655440001"
    assert not verify_pb1(USER_ID, pb1_headers(signature, device_id=other_device), method, path, body)
    # the device id is signed verbatim: the same id in another case is another string
    assert not verify_pb1(USER_ID, pb1_headers(signature, device_id=DEVICE_ID.upper()), method, path, body)
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert not verify_pb1(USER_ID, pb1_headers(flipped), method, path, body)


def test_query_modifications_fail() -> None:
    _, _, body, signature = PB1_VECTORS[2]
    headers = pb1_headers(signature)
    for changed in (
        "/api/events/files?limit=11&offset=0",
        "/api/events/files?offset=0&limit=10",
        "/api/events/files?limit=10&offset=0&",
        "/api/events/files",
        "/api/events/files?",
    ):
        assert not verify_pb1(USER_ID, headers, "GET", changed, body)


def test_upper_case_device_id_signed_verbatim() -> None:
    device = DEVICE_ID.upper()
    signature = sign_pb1(CLIENT_SEED, "GET", "/api/devices", TS, device, b"")
    assert verify_pb1(USER_ID, pb1_headers(signature, device_id=device), "GET", "/api/devices", b"")
    assert not verify_pb1(USER_ID, pb1_headers(signature, device_id=DEVICE_ID), "GET", "/api/devices", b"")


def test_pb1_other_key_or_invalid_key_fails() -> None:
    _, path, body, signature = PB1_VECTORS[0]
    headers = pb1_headers(signature)
    assert not verify_pb1(SERVER_IDENTITY_PUB, headers, "GET", path, body)
    for bad in ("", "00", USER_ID[:-2], USER_ID + "00", "zz" + USER_ID[2:], "ff" * 32):
        assert not verify_pb1(bad, headers, "GET", path, body)


def test_pb1_unencodable_target_fails_without_raising() -> None:
    _, path, body, signature = PB1_VECTORS[0]
    assert not verify_pb1(USER_ID, pb1_headers(signature), "GET", path + "\ud800", body)


def test_surrogate_escaped_target_signs_its_raw_bytes() -> None:
    raw = b"/api/devices?name=caf\xe9"  # not UTF-8: decoded by the HTTP layer with surrogateescape
    target = raw.decode("utf-8", "surrogateescape")
    assert pb1_string("GET", target, TS, DEVICE_ID, b"").split(b"\n")[2] == raw
    signature = sign_pb1(CLIENT_SEED, "GET", target, TS, DEVICE_ID, b"")
    assert verify_pb1(USER_ID, pb1_headers(signature), "GET", target, b"")


# --- PB1 header parsing --------------------------------------------------------------------------------
SIG = PB1_VECTORS[0][3]


def test_parse_pb1_headers_accepts_and_keeps_values_verbatim() -> None:
    assert parse_pb1_headers(DEVICE_ID, TS, SIG) == PB1Headers(device_id=DEVICE_ID, timestamp=TS, signature=SIG)
    headers = parse_pb1_headers(DEVICE_ID.upper(), "0", SIG.upper())
    assert headers == PB1Headers(device_id=DEVICE_ID.upper(), timestamp="0", signature=SIG.upper())
    assert parse_pb1_headers(DEVICE_ID, "9" * 16, SIG) is not None


@pytest.mark.parametrize(
    ("device_id", "timestamp", "signature"),
    [
        (None, TS, SIG),
        (DEVICE_ID, None, SIG),
        (DEVICE_ID, TS, None),
        (None, None, None),
        ("", TS, SIG),
        (DEVICE_ID, "", SIG),
        (DEVICE_ID, TS, ""),
        ("550e8400-e29b-11d4-a716-446655440000", TS, SIG),  # v1, not v4
        ("550e8400-e29b-41d4-c716-446655440000", TS, SIG),  # bad variant
        ("550e8400e29b41d4a716446655440000", TS, SIG),  # no dashes
        ("{550e8400-e29b-41d4-a716-446655440000}", TS, SIG),
        (DEVICE_ID + "\n", TS, SIG),
        (" " + DEVICE_ID, TS, SIG),
        (DEVICE_ID, "1" * 17, SIG),
        (DEVICE_ID, "-1760000000000", SIG),
        (DEVICE_ID, "+1760000000000", SIG),
        (DEVICE_ID, "1760000000000.0", SIG),
        (DEVICE_ID, "1e12", SIG),
        (DEVICE_ID, " 1760000000000", SIG),
        (DEVICE_ID, "1760000000000\n", SIG),
        (DEVICE_ID, "١٧٦٠", SIG),  # Unicode digits are not decimal digits here
        (DEVICE_ID, "0x1a", SIG),
        (DEVICE_ID, TS, SIG[:-1]),
        (DEVICE_ID, TS, SIG + "0"),
        (DEVICE_ID, TS, "g" + SIG[1:]),
        (DEVICE_ID, TS, SIG + "\n"),
        (DEVICE_ID, TS, base64.b64encode(bytes.fromhex(SIG)).decode()),
    ],
)
def test_parse_pb1_headers_rejects(device_id: str | None, timestamp: str | None, signature: str | None) -> None:
    assert parse_pb1_headers(device_id, timestamp, signature) is None


# --- timestamp window ----------------------------------------------------------------------------------
def test_timestamp_window_both_sides() -> None:
    assert timestamp_ok(TS, NOW_MS, SKEW_MS)
    assert timestamp_ok(str(NOW_MS - SKEW_MS), NOW_MS, SKEW_MS)
    assert timestamp_ok(str(NOW_MS + SKEW_MS), NOW_MS, SKEW_MS)
    assert not timestamp_ok(str(NOW_MS - SKEW_MS - 1), NOW_MS, SKEW_MS)
    assert not timestamp_ok(str(NOW_MS + SKEW_MS + 1), NOW_MS, SKEW_MS)
    assert not timestamp_ok("0", NOW_MS, SKEW_MS)
    assert not timestamp_ok("9" * 16, NOW_MS, SKEW_MS)
    assert timestamp_ok("0" + TS, NOW_MS, SKEW_MS)  # leading zeros: same number (signed verbatim anyway)


def test_timestamp_ok_rejects_non_digits() -> None:
    for bad in ("", "-1", "abc", "1760000000000.5", "١٧٦٠"):
        assert not timestamp_ok(bad, NOW_MS, SKEW_MS)


# --- JWT -----------------------------------------------------------------------------------------------
def test_server_identity_vector() -> None:
    assert IDENTITY.public_hex == SERVER_IDENTITY_PUB


def test_jwt_vector_reproduces_byte_for_byte() -> None:
    token = issue_jwt(IDENTITY, device_id=DEVICE_ID, user_id=USER_ID, iat=JWT_IAT, exp=JWT_EXP, jti=JWT_JTI)
    header, claims, signature = token.split(".")
    assert header == JWT_HEADER_B64U
    assert base64.urlsafe_b64decode(header + "==") == b'{"alg":"EdDSA","typ":"JWT"}'
    assert claims == b64u(JWT_CLAIMS_JSON.encode())
    assert signature == JWT_SIGNATURE_B64U
    assert token == f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())}.{JWT_SIGNATURE_B64U}"


VECTOR_TOKEN = f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())}.{JWT_SIGNATURE_B64U}"


def test_jwt_vector_verifies() -> None:
    expected = JwtClaims(device_id=DEVICE_ID, user_id=USER_ID, iat=JWT_IAT, exp=JWT_EXP, jti=JWT_JTI)
    assert verify(VECTOR_TOKEN) == expected
    assert verify(VECTOR_TOKEN, public_hex=SERVER_IDENTITY_PUB.upper()) == expected


def test_jwt_time_bounds() -> None:
    assert verify(VECTOR_TOKEN, now_s=JWT_EXP - 1) is not None
    assert verify(VECTOR_TOKEN, now_s=JWT_EXP) is None  # exp > now is strict
    assert verify(VECTOR_TOKEN, now_s=JWT_EXP + 1000) is None
    assert verify(VECTOR_TOKEN, now_s=JWT_IAT - JWT_SKEW) is not None  # iat ≤ now + skew
    assert verify(VECTOR_TOKEN, now_s=JWT_IAT - JWT_SKEW - 1) is None  # issued in the future beyond skew


def test_jwt_expired() -> None:
    token = forge(json.loads('{"alg":"EdDSA","typ":"JWT"}'), vector_claims(exp=JWT_NOW - 1))
    assert verify(token) is None
    assert verify(forge({"alg": "EdDSA", "typ": "JWT"}, vector_claims(exp=JWT_NOW))) is None


def test_jwt_iat_in_the_future() -> None:
    header = {"alg": "EdDSA", "typ": "JWT"}
    assert verify(forge(header, vector_claims(iat=JWT_NOW + JWT_SKEW))) is not None
    assert verify(forge(header, vector_claims(iat=JWT_NOW + JWT_SKEW + 1))) is None


def test_forge_helper_matches_issue_jwt() -> None:
    assert forge({"alg": "EdDSA", "typ": "JWT"}, vector_claims()) == VECTOR_TOKEN


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "Ed25519", "typ": "JWT"},  # what the original server used
        {"alg": "none", "typ": "JWT"},
        {"alg": "eddsa", "typ": "JWT"},
        {"alg": "HS256", "typ": "JWT"},
        {"typ": "JWT"},
        {"alg": ["EdDSA"]},
        ["EdDSA"],
        b"not json",
        b'{"alg":"EdDSA"',
        b'{"alg":"EdDSA","x":NaN}',
        b"\xff\xfe",
    ],
)
def test_jwt_bad_header(header: Any) -> None:
    assert verify(forge(header, vector_claims())) is None


def test_jwt_header_without_typ_is_accepted() -> None:
    assert verify(forge({"alg": "EdDSA"}, vector_claims())) is not None


def test_jwt_alg_none_without_signature() -> None:
    unsigned = b64u(b'{"alg":"none","typ":"JWT"}') + "." + b64u(JWT_CLAIMS_JSON.encode())
    assert verify(unsigned + ".") is None
    assert verify(unsigned) is None


def test_jwt_tampered_claims() -> None:
    tampered = JWT_CLAIMS_JSON.replace("1760003600", "1860003600").encode()
    assert verify(f"{JWT_HEADER_B64U}.{b64u(tampered)}.{JWT_SIGNATURE_B64U}") is None
    other_user = JWT_CLAIMS_JSON.replace(USER_ID, "ff" * 32).encode()
    assert verify(f"{JWT_HEADER_B64U}.{b64u(other_user)}.{JWT_SIGNATURE_B64U}") is None


def test_jwt_tampered_signature() -> None:
    sig = bytearray(base64.urlsafe_b64decode(JWT_SIGNATURE_B64U + "=="))
    sig[0] ^= 1
    assert verify(f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())}.{b64u(bytes(sig))}") is None
    assert verify(f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())}.{b64u(bytes(sig[:-1]))}") is None


def test_jwt_signed_by_another_key() -> None:
    other = ServerIdentity.from_seed(CLIENT_SEED)
    token = forge({"alg": "EdDSA", "typ": "JWT"}, vector_claims(), key=other)
    assert verify(token) is None
    assert verify(token, public_hex=other.public_hex) is not None


def test_jwt_invalid_server_key() -> None:
    for bad in ("", "00" * 31, SERVER_IDENTITY_PUB + "00", "zz" * 32):
        assert verify(VECTOR_TOKEN, public_hex=bad) is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "..",
        "...",
        f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())}",  # two parts
        f"{VECTOR_TOKEN}.",
        f"{VECTOR_TOKEN}.{JWT_SIGNATURE_B64U}",
        f"{JWT_HEADER_B64U}.!!!!.{JWT_SIGNATURE_B64U}",  # garbage base64
        f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())}.{JWT_SIGNATURE_B64U}==",  # padding
        f"{JWT_HEADER_B64U}=.{b64u(JWT_CLAIMS_JSON.encode())}.{JWT_SIGNATURE_B64U}",
        VECTOR_TOKEN.replace("-", "+").replace("_", "/"),  # standard alphabet
        f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())}.{JWT_SIGNATURE_B64U}A",  # length ≡ 1 mod 4
        f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())}.{JWT_SIGNATURE_B64U[:-1]}h",  # non-canonical tail bits
        f" {VECTOR_TOKEN}",
        f"{VECTOR_TOKEN}\n",
        f"{JWT_HEADER_B64U}.{b64u(JWT_CLAIMS_JSON.encode())} .{JWT_SIGNATURE_B64U}",
        VECTOR_TOKEN.replace("e", "é", 1),
        "\ud800",
        "a" * 5000,
        f"{JWT_HEADER_B64U}.{'A' * 5000}.{JWT_SIGNATURE_B64U}",
    ],
)
def test_jwt_malformed(token: str) -> None:
    assert verify(token) is None


def test_jwt_non_string_token_does_not_raise() -> None:
    assert verify_jwt(SERVER_IDENTITY_PUB, None, now_s=JWT_NOW, skew_s=JWT_SKEW) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"exp": "1760003600"},
        {"exp": 1760003600.0},
        {"exp": None},
        {"exp": True},
        {"iat": True},
        {"iat": False},
        {"iat": "1760000000"},
        {"iat": 1760000000.5},
        {"sub": "not-a-uuid"},
        {"sub": "550e8400-e29b-11d4-a716-446655440000"},
        {"sub": 1},
        {"sub": None},
        {"user_id": USER_ID.upper()},
        {"user_id": USER_ID[:-1]},
        {"user_id": 12},
        {"jti": "0011"},
        {"jti": 7},
        {"jti": "zz" * 16},
        {"iss": "PocketBridge"},
        {"iss": "other"},
        {"iss": None},
    ],
)
def test_jwt_bad_claims(changes: dict[str, Any]) -> None:
    assert verify(forge({"alg": "EdDSA", "typ": "JWT"}, vector_claims(**changes))) is None


@pytest.mark.parametrize("missing", ["iss", "sub", "user_id", "iat", "exp", "jti"])
def test_jwt_missing_claim(missing: str) -> None:
    claims = vector_claims()
    del claims[missing]
    assert verify(forge({"alg": "EdDSA", "typ": "JWT"}, claims)) is None


@pytest.mark.parametrize("claims", [[1, 2], "x", 5, None, b"not json", b'{"iss":"pocketbridge"', b"\xc3\x28"])
def test_jwt_claims_not_an_object(claims: Any) -> None:
    assert verify(forge({"alg": "EdDSA", "typ": "JWT"}, claims)) is None


def test_jwt_upper_case_sub_kept_verbatim() -> None:
    result = verify(forge({"alg": "EdDSA", "typ": "JWT"}, vector_claims(sub=DEVICE_ID.upper())))
    assert result is not None and result.device_id == DEVICE_ID.upper()


def test_jwt_round_trip_with_fresh_values() -> None:
    identity = ServerIdentity.generate()
    device, jti = str(uuid.uuid4()), uuid.uuid4().hex
    token = issue_jwt(identity, device_id=device, user_id=USER_ID, iat=100, exp=3700, jti=jti)
    assert verify_jwt(identity.public_hex, token, now_s=200, skew_s=0) == JwtClaims(device, USER_ID, 100, 3700, jti)


# --- bearer and admin key ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer abc", "abc"),
        ("BEARER abc", "abc"),
        ("BeArEr abc", "abc"),
        ("Bearer a+b/c=", "a+b/c="),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer  abc", None),
        ("Bearer abc ", None),
        ("Bearer abc def", None),
        ("Bearer\tabc", None),
        ("Bearer a\tb", None),
        ("Basic abc", None),
        ("Bearerabc", None),
        ("Token abc", None),
        ("abc", None),
    ],
)
def test_bearer_token(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


KEY = "k" * 16 + "0123456789abcdef"


def test_admin_key_matches() -> None:
    assert admin_key_matches(KEY, KEY)
    assert not admin_key_matches(KEY, KEY + "x")
    assert not admin_key_matches(KEY, KEY[:-1])
    assert not admin_key_matches(KEY, KEY.upper())
    assert not admin_key_matches(KEY, "")
    assert not admin_key_matches(KEY, None)
    assert not admin_key_matches("", "")
    assert not admin_key_matches("", None)
    assert not admin_key_matches("", "anything")
    assert admin_key_matches("ключ-" + KEY, "ключ-" + KEY)  # non-ASCII compares as UTF-8 bytes
    assert not admin_key_matches(KEY, "\ud800")  # never raises


def test_presented_admin_key() -> None:
    assert presented_admin_key(KEY, None) == KEY
    assert presented_admin_key(None, f"Bearer {KEY}") == KEY
    assert presented_admin_key(KEY, "Bearer other") == KEY  # X-Admin-API-Key wins
    assert presented_admin_key("", f"Bearer {KEY}") == KEY  # an empty header counts as absent
    assert presented_admin_key(None, f"Basic {KEY}") is None
    assert presented_admin_key(None, None) is None
    assert presented_admin_key("", None) is None


# --- X-Request-ID ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["a", "abc-123", "A.b_c:d-e", "x" * 128, str(uuid.uuid4()), "0"])
def test_request_id_is_echoed(value: str) -> None:
    assert request_id(value) == value


@pytest.mark.parametrize(
    "value", [None, "", "x" * 129, "has space", "abc\n", "abc\r\n", "a/b", "a\tb", "é", "x" * 127 + "é", "ａ"]
)
def test_request_id_is_regenerated(value: str | None) -> None:
    generated = request_id(value)
    assert generated != value
    parsed = uuid.UUID(generated)
    assert parsed.version == 4 and str(parsed) == generated
    assert request_id(value) != generated
