"""The one error catalogue: exception hierarchy and the fixed close codes/reasons of protocol.md.

Internal errors are mapped to these at the boundary (gateway: close frames; http: error bodies).
Close reasons are fixed strings of at most 123 bytes; no exception text ever reaches a client.
"""

from __future__ import annotations

import attrs


class PocketBridgeError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(PocketBridgeError):
    """The configuration is invalid; ``problems`` holds one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class IdentityError(PocketBridgeError):
    """The server identity key file is missing, unreadable or malformed."""


class StoreUnavailable(PocketBridgeError):
    """The store could not be reached or did not answer in time (clients get 1013)."""


class BusUnavailable(PocketBridgeError):
    """The fan-out bus could not be reached."""


@attrs.frozen
class Close:
    """A WebSocket close code and its fixed reason."""

    code: int
    reason: str


class ProtocolClose(PocketBridgeError):
    """Raised by protocol code when the connection must be closed with ``close``."""

    def __init__(self, close: Close) -> None:
        super().__init__(f"{close.code} {close.reason}")
        self.close = close


# --- close catalogue (protocol.md §9) -------------------------------------------------------------
REPLACED = Close(1000, "New connection established for this device")
REVOKED_CLOSE = Close(1000, "Device revoked")
ACCOUNT_DELETED = Close(1000, "Account deleted")
SESSION_EXPIRED = Close(1001, "Session expired")
SHUTTING_DOWN = Close(1001, "Server shutting down")
INVALID_FORMAT = Close(1008, "Invalid message format")
HANDSHAKE_TIMEOUT = Close(1008, "Handshake timeout")
EXPECTED_HELLO = Close(1008, "Invalid handshake step: expected client_hello")
EXPECTED_AUTH = Close(1008, "Invalid handshake step: expected client_auth")
INVALID_SIGNATURE = Close(1008, "Invalid client signature")
DEVICE_KEY_MISMATCH = Close(1008, "Device key mismatch")
DEVICE_LIMIT = Close(1008, "Device limit reached")
DEVICE_REVOKED = Close(1008, "Device has been revoked")
TOO_MANY_CONNECTIONS = Close(1008, "Too many connection attempts. Please try again later.")
TOO_MANY_HANDSHAKES = Close(1008, "Too many handshake attempts. Please try again later.")
SEQUENCE_CONFLICT = Close(1008, "Device sequence conflict")
PAIRING_LOCKOUT = Close(1008, "Too many failed pairing attempts")
HEARTBEAT_TIMEOUT = Close(1008, "Heartbeat timeout")
MESSAGE_TOO_BIG = Close(1009, "Message too big")
INTERNAL_ERROR = Close(1011, "Internal error")
TRY_AGAIN = Close(1013, "Try again later")
TOO_MANY_EVENTS = Close(1013, "Too many events. Please slow down.")

# Fields of the handshake whose failure reason is "Missing or invalid <field>" (§3.3, §3.5).
HANDSHAKE_FIELDS = (
    "client_ephemeral_pub",
    "nonce_c",
    "user_id",
    "device_id",
    "client_signature",
    "nonce_c2",
)


def missing_or_invalid(field: str) -> Close:
    """The close for a malformed handshake field."""
    if field not in HANDSHAKE_FIELDS:
        raise ValueError(f"not a handshake field: {field}")
    return Close(1008, f"Missing or invalid {field}")
