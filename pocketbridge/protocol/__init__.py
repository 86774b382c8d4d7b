"""The pure PocketBridge wire protocol: envelope, handshake, events and replay (no I/O)."""

from pocketbridge.protocol.envelope import Message, encode, parse_frame
from pocketbridge.protocol.events import (
    ErrorFrame,
    NewEvent,
    Rejection,
    ack_stored,
    validate_event,
)
from pocketbridge.protocol.handshake import (
    ClientAuth,
    ClientHello,
    ServerHandshake,
    ServerIdentity,
    SessionKeys,
    digest_c,
    digest_s,
    handshake_body,
    parse_client_auth,
    parse_client_hello,
    sanitize_device_name,
)
from pocketbridge.protocol.names import dedupe_device_name
from pocketbridge.protocol.replay import (
    ReplayParams,
    make_token,
    parse_replay_request,
    read_token,
)

__all__ = [
    "ClientAuth",
    "ClientHello",
    "ErrorFrame",
    "Message",
    "NewEvent",
    "Rejection",
    "ReplayParams",
    "ServerHandshake",
    "ServerIdentity",
    "SessionKeys",
    "ack_stored",
    "dedupe_device_name",
    "digest_c",
    "digest_s",
    "encode",
    "handshake_body",
    "make_token",
    "parse_client_auth",
    "parse_client_hello",
    "parse_frame",
    "parse_replay_request",
    "read_token",
    "sanitize_device_name",
    "validate_event",
]
