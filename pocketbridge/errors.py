"""The one error catalogue: exception hierarchy and the fixed close codes/reasons of protocol.md.

Internal errors are mapped to these at the boundary (gateway: close frames; http: error bodies).
Close reasons are fixed strings of at most 123 bytes; no exception text ever reaches a client.
"""

from __future__ import annotations

import errno

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


class StartupError(PocketBridgeError):
    """The daemon cannot start: one line naming the setting, its variable and what to do."""


def listen_problem(key: str, address: str, exc: OSError) -> str:
    """Why ``[listen] <key> = address`` cannot be bound, for a person."""
    where = f"[listen] {key} {address}"
    env = f"PB_LISTEN_{key.upper()}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where} is already in use ({env}); stop the other process or choose another address"
    if exc.errno == errno.EACCES:
        return f"{where} cannot be bound: permission denied ({env}); ports below 1024 need CAP_NET_BIND_SERVICE"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where} is not an address of this host ({env}); choose one of its addresses or 0.0.0.0"
    return f"{where} cannot be bound ({env}): {exc.strerror or type(exc).__name__}"


def find_error(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` inside ``exc`` (trio wraps errors of nurseries in exception groups)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_error(inner, kind)
            if found is not None:
                return found
    return None


class StorageFull(StoreUnavailable):
    """The store's disk is full (SQLITE_FULL / ENOSPC): writes fail until space is freed."""


class BusUnavailable(PocketBridgeError):
    """The fan-out bus could not be reached."""


@attrs.frozen
class Close:
    """A WebSocket close code and its fixed reason."""

    code: int
    reason: str


class ProtocolClose(PocketBridgeError):
    """Raised by protocol code when the connection must be closed with ``close``."""

    def __init__(self, close: Close, subject: str | None = None) -> None:
        super().__init__(f"{close.code} {close.reason}")
        self.close = close
        self.subject = subject  # the device concerned, when known (for the audit trail)


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


# --- HTTP error catalogue (protocol.md §10) ---------------------------------------------------------
# code -> (status, fixed text). Handlers raise ApiError(code) or ApiError(code, text) where the spec
# gives a specific text; the boundary turns it into {"error", "code", "request_id"}.
HTTP_ERRORS: dict[str, tuple[int, str]] = {
    "AUTH_REQUIRED": (401, "Authentication required"),
    "INVALID_AUTH_HEADERS": (401, "Invalid authentication headers"),
    "TIMESTAMP_OUT_OF_RANGE": (401, "Request timestamp out of range"),
    "INVALID_SIGNATURE": (401, "Invalid request signature"),
    "REPLAYED_REQUEST": (401, "Request signature already used"),
    "DEVICE_REVOKED": (401, "Device has been revoked"),
    "INVALID_TOKEN": (401, "Invalid or expired token"),
    "ADMIN_AUTH_REQUIRED": (401, "Admin authentication required"),
    "ADMIN_DISABLED": (403, "Admin API is disabled"),
    "FORBIDDEN": (403, "Forbidden"),
    "NOT_FOUND": (404, "Not found"),
    "DEVICE_NOT_FOUND": (404, "Device not found"),
    "METHOD_NOT_ALLOWED": (405, "Method not allowed"),
    "DEVICE_NAME_TAKEN": (409, "Another device with this name already exists"),
    "DEVICE_LIMIT": (409, "Device limit reached"),
    "GONE": (
        410,
        "Pairing over REST has been removed."
        " Pair devices over the WebSocket with initiate_pairing and complete_pairing.",
    ),
    "PAYLOAD_TOO_LARGE": (413, "Request body too large"),
    "UNSUPPORTED_MEDIA_TYPE": (415, "Unsupported media type"),
    "INVALID_JSON": (400, "Invalid JSON body"),
    "INVALID_DEVICE_ID": (400, "Invalid device ID"),
    "INVALID_DEVICE_NAME": (400, "Device name must be 1-50 characters"),
    "VALIDATION_ERROR": (400, "Validation error"),
    "NO_UPDATES": (400, "No valid updates provided"),
    "RATE_LIMITED": (429, "Too many requests"),
    "SERVICE_UNAVAILABLE": (503, "Service temporarily unavailable"),
    "INTERNAL_ERROR": (500, "Internal server error"),
}


class ApiError(PocketBridgeError):
    """An HTTP error with a code of ``HTTP_ERRORS``; ``text`` only from the spec's fixed strings."""

    def __init__(self, code: str, text: str | None = None, *, retry_after: int | None = None) -> None:
        status, default = HTTP_ERRORS[code]
        super().__init__(code)
        self.code = code
        self.status = status
        self.text = text or default
        self.retry_after = retry_after
