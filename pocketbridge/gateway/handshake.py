"""The handshake driver (§3): AWAIT_HELLO -> AWAIT_AUTH -> admission. Pure checks live in protocol/."""

from __future__ import annotations

from ..audit import audit
from ..errors import (
    DEVICE_KEY_MISMATCH,
    DEVICE_LIMIT,
    DEVICE_REVOKED,
    EXPECTED_AUTH,
    EXPECTED_HELLO,
    TOO_MANY_HANDSHAKES,
    TRY_AGAIN,
    Close,
    ProtocolClose,
)
from ..protocol.envelope import Message, encode, parse_frame
from ..protocol.handshake import ServerHandshake, parse_client_auth, parse_client_hello
from ..store import Admit, AdmitRequest, Device
from .connection import Connection
from .context import Gateway
from .wsconn import WebSocket

_REFUSALS: dict[Admit, Close] = {
    Admit.DELETING: TRY_AGAIN,
    Admit.KEY_MISMATCH: DEVICE_KEY_MISMATCH,
    Admit.REVOKED: DEVICE_REVOKED,
    Admit.LIMIT: DEVICE_LIMIT,
}


async def _next(ws: WebSocket, expected: str, step: Close) -> Message:
    msg = parse_frame(await ws.get_message())
    if msg.type != expected:
        raise ProtocolClose(step)
    return msg


async def perform_handshake(gw: Gateway, conn: Connection) -> tuple[Device, str]:
    """Run the handshake; returns the admitted device and the device id exactly as sent.

    Raises ProtocolClose with the spec's close for every refusal, StoreUnavailable when the store
    does not answer, wsconn.ConnectionClosed when the peer goes away.
    """
    hello_message = await _next(conn.ws, "client_hello", EXPECTED_HELLO)
    if not gw.limits.handshakes_per_ip.take(conn.peer):
        gw.metrics.rate_limited.labels("handshakes_per_ip").inc()
        raise ProtocolClose(TOO_MANY_HANDSHAKES)
    hello = parse_client_hello(hello_message)
    handshake = ServerHandshake(gw.identity, hello)
    conn.send(encode(handshake.server_hello()))
    auth = parse_client_auth(await _next(conn.ws, "client_auth", EXPECTED_AUTH))
    handshake.verify(auth)
    request = AdmitRequest(
        key=auth.user_id.lower(),
        device_id=auth.device_id.lower(),
        device_name=auth.device_name,
        device_type=auth.device_type,
        max_devices=gw.config.limits.max_devices_per_user,
    )
    admission = await gw.store.admit_device(request, gw.clock.now_ms())
    if admission.outcome is not Admit.OK:
        raise ProtocolClose(_REFUSALS[admission.outcome], subject=request.device_id)
    assert admission.device is not None
    if admission.created:
        audit(gw, "device_registered", actor=request.device_id, target=admission.device.user_id, peer=conn.peer)
    return admission.device, auth.device_id
