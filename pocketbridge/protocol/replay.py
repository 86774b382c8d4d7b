"""``replay_request`` parameters and continuation tokens (protocol.md §6.1, §6.6). Pure: no I/O."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from typing import Any, TypeGuard

import attrs

from pocketbridge.protocol.envelope import Message, as_integral, encode

MAX_TOKEN_CHARS = 1024
_B64U_RE = re.compile(r"[A-Za-z0-9_-]*={0,2}")


@attrs.frozen
class ReplayParams:
    """The parameters of one ``replay_request``."""

    limit: int
    continuation_token: str | None
    last_ack_device_seq: int | None


def _param(msg: Message, key: str) -> Any:
    """``payload[key]`` when present and not null, else the top-level ``key`` (§6.1)."""
    if isinstance(msg.payload, dict) and msg.payload.get(key) is not None:
        return msg.payload[key]
    return msg.raw.get(key)


def parse_replay_request(msg: Message, *, default_page_size: int, max_page_size: int) -> ReplayParams:
    """Read ``limit`` (clamped; invalid → default), ``continuation_token`` and ``last_ack_device_seq``."""
    limit = as_integral(_param(msg, "limit"))
    token = _param(msg, "continuation_token")
    return ReplayParams(
        limit=default_page_size if limit is None else max(1, min(limit, max_page_size)),
        continuation_token=token if isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_CHARS else None,
        last_ack_device_seq=as_integral(_param(msg, "last_ack_device_seq")),
    )


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64u(text: str) -> bytes:
    """Strict base64url decoding, padding optional; ValueError when malformed."""
    if not _B64U_RE.fullmatch(text):
        raise ValueError("not base64url")
    body = text.rstrip("=")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _mac(key: bytes, claims: bytes) -> bytes:
    return hmac.new(key, claims, hashlib.sha256).digest()


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def make_token(key: bytes, user_id: str, device_id: str, seq: int, issued_ms: int) -> str:
    """``B64U(J) "." B64U(HMAC-SHA256(K_token, J))`` with J = {"v":1,"u":U,"d":D,"s":seq,"t":issued} (§6.6)."""
    claims = encode({"v": 1, "u": user_id, "d": device_id, "s": seq, "t": issued_ms}).encode("utf-8")
    return f"{_b64u(claims)}.{_b64u(_mac(key, claims))}"


def read_token(key: bytes, token: str, *, user_id: str, device_id: str, now_ms: int, max_age_ms: int) -> int | None:
    """The server_seq of a valid token for this U/D, or None if it fails any check of §6.6. Never raises."""
    if not isinstance(token, str) or token.count(".") != 1:
        return None
    claims_part, mac_part = token.split(".")
    try:
        claims, mac = _unb64u(claims_part), _unb64u(mac_part)
    except (ValueError, binascii.Error):
        return None
    if not hmac.compare_digest(mac, _mac(key, claims)):
        return None
    try:
        parsed = json.loads(claims)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    version, seq, issued = parsed.get("v"), parsed.get("s"), parsed.get("t")
    if not (_is_int(version) and version == 1 and _is_int(seq) and seq >= 0 and _is_int(issued)):
        return None
    if parsed.get("u") != user_id or parsed.get("d") != device_id or now_ms - issued > max_age_ms:
        return None
    return seq
