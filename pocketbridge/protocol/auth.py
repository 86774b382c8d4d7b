"""HTTP authentication (protocol.md §10.1, §10.2, §10.4): PB1 signed requests, bearer JWTs, admin key,
request ids. Pure: no I/O, no clock (callers pass ``now``)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from typing import Any, TypeGuard

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pocketbridge.protocol.envelope import is_hex, is_uuid4
from pocketbridge.protocol.handshake import ServerIdentity
from pocketbridge.protocol.keys import load_public_key

EMPTY_BODY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
JWT_ISSUER = "pocketbridge"
JWT_HEADER = b'{"alg":"EdDSA","typ":"JWT"}'
MAX_JWT_CHARS = 4096  # ours are ~400; anything far longer is not ours and is refused before decoding

_TIMESTAMP_RE = re.compile(r"[0-9]{1,16}", re.ASCII)
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)
_B64U_RE = re.compile(r"[A-Za-z0-9_-]*", re.ASCII)


# --- PB1 signed requests (§10.2) ----------------------------------------------------------------------
def pb1_string(method: str, path_with_query: str, timestamp: str, device_id: str, body: bytes) -> bytes:
    """The exact bytes a PB1 client signs: method upper-cased, everything else verbatim.

    Encoded as UTF-8 with ``surrogateescape``, so a request target decoded from raw bytes with
    ``surrogateescape`` signs its original bytes. Raises UnicodeEncodeError on other lone surrogates.
    """
    text = "\n".join(("PB1", method.upper(), path_with_query, timestamp, device_id, hashlib.sha256(body).hexdigest()))
    return text.encode("utf-8", "surrogateescape")


def sign_pb1(key_seed: bytes, method: str, path_with_query: str, timestamp: str, device_id: str, body: bytes) -> str:
    """The ``X-PB-Signature`` value (128 lowercase hex) of a request, signed with a 32-byte Ed25519 seed."""
    key = Ed25519PrivateKey.from_private_bytes(bytes(key_seed))
    return key.sign(pb1_string(method, path_with_query, timestamp, device_id, body)).hex()


@attrs.frozen
class PB1Headers:
    """The three well-formed ``X-PB-*`` header values, verbatim as sent."""

    device_id: str
    timestamp: str
    signature: str


def parse_pb1_headers(device_id: str | None, timestamp: str | None, signature: str | None) -> PB1Headers | None:
    """Check 1 of §10.2: all three present and well-formed, else None.

    Device id: a §2 UUID v4, any case. Timestamp: 1-16 ASCII decimal digits. Signature: 128 hex, any case.
    Values are not stripped (the HTTP layer already removes surrounding whitespace).
    """
    if not is_uuid4(device_id):
        return None
    if not (isinstance(timestamp, str) and _TIMESTAMP_RE.fullmatch(timestamp)):
        return None
    if not is_hex(signature, 128):
        return None
    return PB1Headers(device_id=device_id, timestamp=timestamp, signature=signature)


def timestamp_ok(timestamp: str, now_ms: int, skew_ms: int) -> bool:
    """Check 2 of §10.2: |now − timestamp| ≤ skew (both bounds inclusive); False if not decimal digits."""
    if not _TIMESTAMP_RE.fullmatch(timestamp):
        return False
    return abs(now_ms - int(timestamp)) <= skew_ms


def verify_pb1(bound_key_hex: str, headers: PB1Headers, method: str, path_with_query: str, body: bytes) -> bool:
    """Signature part of check 3 of §10.2; False on any failure (bad key, bad signature, unencodable target)."""
    if not (is_hex(bound_key_hex, 64) and is_hex(headers.signature, 128)):
        return False
    try:
        key = load_public_key(bound_key_hex)  # a small-order or non-canonical key fails too (§2)
        message = pb1_string(method, path_with_query, headers.timestamp, headers.device_id, body)
        key.verify(bytes.fromhex(headers.signature), message)
    except (ValueError, InvalidSignature):  # UnicodeEncodeError is a ValueError
        return False
    return True


# --- bearer tokens (§10.2) -----------------------------------------------------------------------------
def _b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64u_decode(part: str) -> bytes | None:
    """Strict unpadded base64url: alphabet only, canonical (re-encodes to the same text), else None."""
    if len(part) % 4 == 1 or not _B64U_RE.fullmatch(part):
        return None
    data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    return data if _b64u_encode(data) == part else None


def _json_object(data: bytes) -> dict[str, Any] | None:
    def reject(name: str) -> Any:
        raise ValueError(name)

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=reject)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def issue_jwt(identity: ServerIdentity, *, device_id: str, user_id: str, iat: int, exp: int, jti: str) -> str:
    """A bearer JWT: header ``{"alg":"EdDSA","typ":"JWT"}``, claims iss, sub, user_id, iat, exp, jti (compact JSON)."""
    claims = {"iss": JWT_ISSUER, "sub": device_id, "user_id": user_id, "iat": iat, "exp": exp, "jti": jti}
    claims_json = json.dumps(claims, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    signing_input = _b64u_encode(JWT_HEADER) + "." + _b64u_encode(claims_json.encode("ascii"))
    return signing_input + "." + _b64u_encode(identity.sign(signing_input.encode("ascii")))


@attrs.frozen
class JwtClaims:
    """The claims of a valid bearer token; ``device_id`` is ``sub``."""

    device_id: str
    user_id: str
    iat: int
    exp: int
    jti: str


def verify_jwt(server_public_hex: str, token: str, *, now_s: int, skew_s: int) -> JwtClaims | None:
    """The token-only checks of §10.2 (the device checks need the store); None if any fails. Never raises.

    Three strict base64url parts; header a JSON object with ``alg`` = ``EdDSA`` (``typ`` not checked); the
    Ed25519 signature over ``header "." claims`` as sent verifies; ``iss`` = ``pocketbridge``; ``sub`` a UUID v4;
    ``user_id`` 64 lowercase hex; ``iat``/``exp`` ints (not bools, not floats); ``jti`` 32 hex;
    ``exp`` > now; ``iat`` ≤ now + skew.
    """
    if not (isinstance(token, str) and len(token) <= MAX_JWT_CHARS and is_hex(server_public_hex, 64)):
        return None
    parts = token.split(".")
    if len(parts) != 3:
        return None
    header_raw, claims_raw, signature = (_b64u_decode(part) for part in parts)
    if header_raw is None or claims_raw is None or signature is None:
        return None
    header = _json_object(header_raw)
    if header is None or header.get("alg") != "EdDSA":
        return None
    try:
        key = load_public_key(server_public_hex)
        key.verify(signature, (parts[0] + "." + parts[1]).encode("ascii"))
    except (ValueError, InvalidSignature):
        return None
    claims = _json_object(claims_raw)
    if claims is None or claims.get("iss") != JWT_ISSUER:
        return None
    sub, user_id, iat, exp, jti = (claims.get(k) for k in ("sub", "user_id", "iat", "exp", "jti"))
    if not (is_uuid4(sub) and is_hex(user_id, 64) and user_id == user_id.lower() and is_hex(jti, 32)):
        return None
    if not (_is_int(iat) and _is_int(exp)):
        return None
    if not (exp > now_s and iat <= now_s + skew_s):
        return None
    return JwtClaims(device_id=sub, user_id=user_id, iat=iat, exp=exp, jti=jti)


# --- Authorization header, admin key (§10.4) ---------------------------------------------------------
def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>``: scheme any case, exactly one space, no whitespace in it."""
    if authorization is None:
        return None
    parts = authorization.split(" ")
    if len(parts) != 2:
        return None
    scheme, token = parts
    if not (scheme.isascii() and scheme.lower() == "bearer") or not token or any(c.isspace() for c in token):
        return None
    return token


def presented_admin_key(x_admin_api_key: str | None, authorization: str | None) -> str | None:
    """The admin key a request presents: a non-empty ``X-Admin-API-Key``, else the bearer token, else None."""
    if x_admin_api_key:
        return x_admin_api_key
    return bearer_token(authorization)


def admin_key_matches(configured: str, presented: str | None) -> bool:
    """Constant-time comparison of the UTF-8 bytes; False when no key is configured or none is presented."""
    if not configured or presented is None:
        return False
    return hmac.compare_digest(configured.encode("utf-8", "surrogatepass"), presented.encode("utf-8", "surrogatepass"))


# --- X-Request-ID (§10.1) -----------------------------------------------------------------------------
def request_id(header_value: str | None) -> str:
    """The request's id: the ``X-Request-ID`` value if it matches ``[A-Za-z0-9._:-]{1,128}``, else a new UUIDv4."""
    if header_value is not None and _REQUEST_ID_RE.fullmatch(header_value):
        return header_value
    return str(uuid.uuid4())
