"""Client ``event`` validation and server ``ack``/``error`` frames (protocol.md §5.1-5.3). Pure: no I/O."""

from __future__ import annotations

import re
from typing import Any, TypeGuard

import attrs

from pocketbridge.protocol.envelope import as_integral, is_hex, is_uuid4, is_uuid7

MAX_SAFE_INTEGER = 2**53 - 1  # bound of device_seq and ttl: the largest integer a JS client can send
INVALID_EVENT = "INVALID_EVENT"
_NAME_RE = re.compile(r"[A-Za-z0-9:_-]+")
# (max length, required / too long / format messages) of check 7 and check 8
_STREAM_ID_RULE = (256, "Stream ID is required", "Stream ID is too long", "Invalid stream ID format")
_TYPE_RULE = (64, "Event type is required", "Event type is too long", "Invalid event type format")
EXPIRED_TEXT = "Event TTL has expired (considering clock skew tolerance)"
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@attrs.frozen
class NewEvent:
    """A valid event ready for the store: ids lowercase, ``user_id`` = U, ``ttl`` None when none."""

    event_id: str
    user_id: str
    device_id: str
    device_seq: int
    stream_id: str
    type: str
    encrypted_payload: str
    payload_size: int
    ttl: int | None


@attrs.frozen
class Rejection:
    """An event refused for good: answered with a ``rejected`` ack."""

    device_seq: int
    event_id: str | None
    code: str
    error: str

    def ack(self) -> dict[str, Any]:
        """The full ``ack`` message (§5.3)."""
        payload: dict[str, Any] = {"device_seq": self.device_seq}
        if self.event_id is not None:
            payload["event_id"] = self.event_id
        payload.update(status="rejected", code=self.code, error=self.error)
        return {"type": "ack", "payload": payload}


@attrs.frozen
class ErrorFrame:
    """An event that cannot be acked (no usable ``device_seq``): answered with an ``error`` frame."""

    code: str
    error: str

    def frame(self) -> dict[str, Any]:
        """The full ``error`` message (§5.3)."""
        return {"type": "error", "payload": {"code": self.code, "error": self.error}}


def ack_stored(device_seq: int, event_id: str, status: str) -> dict[str, Any]:
    """The ack of a stored event; ``status`` is ``stored`` or ``duplicate``."""
    return {"type": "ack", "payload": {"device_seq": device_seq, "event_id": event_id, "status": status}}


def _present(value: object) -> TypeGuard[str]:
    """Whether a "required" field passes: present, a string, and not empty."""
    return isinstance(value, str) and bool(value)


def _name_error(value: Any, rule: tuple[int, str, str, str]) -> str | None:
    """The check 7/8 message for a ``stream_id``/``type`` value, or None when it is valid."""
    max_len, required, too_long, bad_format = rule
    if not _present(value):
        return required
    if len(value) > max_len:
        return too_long
    return None if _NAME_RE.fullmatch(value) else bad_format


def b64_decoded_size(value: str) -> int | None:
    """Decoded length of standard base64 (padding optional, no whitespace), or None if it is not base64.

    Checks the alphabet without decoding; non-zero trailing bits are tolerated.
    """
    body = value.rstrip("=")
    padding = len(value) - len(body)
    if padding > 2 or (padding and len(value) % 4) or len(body) % 4 == 1 or not body.isascii():
        return None
    if body.encode("ascii").translate(None, _B64_ALPHABET):  # leftovers are outside the alphabet (or inner '=')
        return None
    return len(body) * 3 // 4


def validate_event(
    payload: Any,
    *,
    session_user: str,
    bound_key: str,
    device_id: str,
    now_ms: int,
    max_payload_bytes: int,
    clock_skew_ms: int,
) -> NewEvent | Rejection | ErrorFrame:
    """Checks 2-12 of §5.2 in order; the first failure decides. U, K and D are given lowercase."""
    if not isinstance(payload, dict):
        return ErrorFrame(INVALID_EVENT, "Invalid event structure")
    seq = as_integral(payload.get("device_seq"))
    if seq is None:
        return ErrorFrame(INVALID_EVENT, "Device sequence must be an integer")
    if seq < 1:
        return ErrorFrame(INVALID_EVENT, "Device sequence must be >= 1")
    if seq > MAX_SAFE_INTEGER:
        return ErrorFrame(INVALID_EVENT, "Device sequence too large")

    raw_event_id = payload.get("event_id")
    event_id = raw_event_id.lower() if is_uuid7(raw_event_id) else None

    def reject(error: str, code: str = INVALID_EVENT) -> Rejection:
        return Rejection(device_seq=seq, event_id=event_id, code=code, error=error)

    if not _present(raw_event_id):
        return reject("Event ID is required")
    if event_id is None:
        return reject("Invalid event ID format (must be UUIDv7)")

    raw_user = payload.get("user_id")
    claimed_user: str | None = None  # None: absent, null or blank, filled with U
    if not (raw_user is None or (isinstance(raw_user, str) and not raw_user.strip())):
        if not is_hex(raw_user, 64):
            return reject("Invalid user ID format (must be Ed25519 public key hex)")
        claimed_user = raw_user.lower()

    raw_device = payload.get("device_id")
    if not _present(raw_device):
        return reject("Device ID is required")
    if not is_uuid4(raw_device):
        return reject("Invalid device ID format (must be UUIDv4)")

    name_error = _name_error(payload.get("stream_id"), _STREAM_ID_RULE) or _name_error(payload.get("type"), _TYPE_RULE)
    if name_error:
        return reject(name_error)

    encrypted = payload.get("encrypted_payload")
    if not _present(encrypted):
        return reject("Encrypted payload is required")
    size = b64_decoded_size(encrypted)
    if size is None:
        return reject("Invalid encrypted payload (must be base64)")
    if size == 0:
        return reject("Payload cannot be empty")
    if size > max_payload_bytes:
        return reject(f"Payload too large (max {max_payload_bytes} bytes)", "PAYLOAD_TOO_LARGE")

    raw_ttl = payload.get("ttl")
    ttl = as_integral(raw_ttl)
    if raw_ttl is not None and (ttl is None or not 0 <= ttl <= MAX_SAFE_INTEGER):
        return reject("Invalid event TTL")
    ttl = ttl or None  # absent, null or 0: no ttl
    if ttl is not None and ttl < now_ms - clock_skew_ms:
        return reject(EXPIRED_TEXT, "EVENT_EXPIRED")

    if claimed_user not in (None, session_user, bound_key):
        return reject("Event user_id mismatch", "USER_MISMATCH")
    if raw_device.lower() != device_id:
        return reject("Event device_id mismatch", "DEVICE_MISMATCH")

    return NewEvent(
        event_id=event_id,
        user_id=session_user,
        device_id=device_id,
        device_seq=seq,
        stream_id=payload["stream_id"],
        type=payload["type"],
        encrypted_payload=encrypted,
        payload_size=size,
        ttl=ttl,
    )
