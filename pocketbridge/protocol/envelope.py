"""Message envelope (protocol.md §1.3) and the shared wire formats of §2."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeGuard

import attrs

from pocketbridge.errors import INVALID_FORMAT, ProtocolClose

# --- wire formats (§2): inputs in any case, ASCII only ---------------------------------------------
_FLAGS = re.ASCII | re.IGNORECASE
_HEX_RE = re.compile(r"[0-9a-f]*", _FLAGS)
_UUID4_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", _FLAGS)
_UUID7_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", _FLAGS)


def is_hex(value: object, length: int) -> TypeGuard[str]:
    """Whether ``value`` is a string of exactly ``length`` hex digits (any case)."""
    return isinstance(value, str) and len(value) == length and _HEX_RE.fullmatch(value) is not None


def is_uuid4(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a UUID v4 string (§2, any case)."""
    return isinstance(value, str) and _UUID4_RE.fullmatch(value) is not None


def is_uuid7(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a UUID v7 string (§2, any case; variant nibble unchecked)."""
    return isinstance(value, str) and _UUID7_RE.fullmatch(value) is not None


def as_integral(value: object) -> int | None:
    """``value`` as an int if it is a JSON integer or an integral float (``5.0``); never a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


# --- envelope ----------------------------------------------------------------------------------------
@attrs.frozen
class Message:
    """A decoded client message: its ``type``, its ``payload`` (any JSON value or None) and the raw object."""

    type: str
    payload: Any
    raw: dict[str, Any]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


# one decoder and one encoder for every frame (json.loads/dumps with options build a new one per call)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def parse_frame(data: str | bytes) -> Message:
    """Decode one frame; anything but a JSON object with a string ``type`` closes with 1008."""
    try:
        text = bytes(data).decode("utf-8") if not isinstance(data, str) else data
        raw = _DECODER.decode(text)
    except (ValueError, RecursionError, TypeError):  # UnicodeDecodeError is a ValueError
        raise ProtocolClose(INVALID_FORMAT) from None
    if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
        raise ProtocolClose(INVALID_FORMAT)
    return Message(type=raw["type"], payload=raw.get("payload"), raw=raw)


def encode(message: Mapping[str, Any]) -> str:
    """Compact JSON text of an outgoing message."""
    return _ENCODER.encode(message if type(message) is dict else dict(message))
