"""Pairing over WebSocket (§7): ``initiate_pairing`` and ``complete_pairing``.

Codes live in the store (shared by every instance); failure limits are per connection, per peer
address per hour and deployment-wide per minute. No private key is ever sent, stored or returned.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..audit import audit
from ..errors import PAIRING_LOCKOUT, StoreUnavailable
from ..protocol.envelope import encode
from ..store import Pairing

if TYPE_CHECKING:
    from .session import Session

CODE_FORMAT = re.compile(r"[0-9]{6}")
LOCKOUT = "Too many failed pairing attempts"
DEPLOYMENT_LOCKOUT = "Too many failed pairing attempts. Please try again later."
NOT_FOUND = "Pairing code not found or expired"
STORE_FAILED = "Pairing failed. Please try again."
ACCOUNT_FULL = "Device limit reached for this account"
TOO_MANY_REQUESTS = "Too many pairing requests. Please try again later."
GLOBAL_KEY = "deployment"


def _failed(error: str) -> str:
    return encode({"type": "pairing_failed", "payload": {"error": error}})


async def initiate_pairing(session: Session) -> None:
    gw = session.gw
    cfg = gw.config
    if gw.limits.pairing_initiations.available(session.device_id) < 1:
        gw.metrics.rate_limited.labels("pairing_initiations").inc()
        audit(gw, "rate_limited", actor=session.device_id, peer=session.conn.peer, detail="pairing_initiations")
        session.conn.send(_failed(TOO_MANY_REQUESTS))
        return
    try:
        issued = await gw.store.create_pairing_code(
            session.user_id, session.device_id, int(cfg.pairing.code_ttl * 1000), cfg.limits.max_devices_per_user
        )
    except StoreUnavailable:
        session.conn.send(_failed(STORE_FAILED))
        return
    if issued is None:
        session.conn.send(_failed(ACCOUNT_FULL))
        return
    gw.limits.pairing_initiations.take(session.device_id)
    code, expires_at = issued
    payload = {"code": code, "expiresIn": max(0, expires_at - gw.clock.now_ms()), "expires_at": expires_at}
    session.conn.send(encode({"type": "pairing_initiated", "payload": payload}))


def _lock_out(session: Session) -> None:
    session.gw.metrics.rate_limited.labels("pairing_failures").inc()
    audit(session.gw, "rate_limited", actor=session.device_id, peer=session.conn.peer, detail="pairing_failures")
    session.conn.close(PAIRING_LOCKOUT, _failed(LOCKOUT))


def _not_a_failure(session: Session, peer: str) -> None:
    """Give back what an attempt was charged in advance: only a wrong code counts (§7)."""
    session.pairing_failures -= 1
    session.gw.limits.pairing_failures_per_ip.give_back(peer)
    session.gw.limits.pairing_failures.give_back(GLOBAL_KEY)


def _deployment_lockout(session: Session) -> None:
    session.gw.metrics.rate_limited.labels("pairing_failures_deployment").inc()
    audit(session.gw, "rate_limited", actor=session.device_id, peer=session.conn.peer,
          detail="pairing_failures_deployment")
    session.conn.send(_failed(DEPLOYMENT_LOCKOUT))


async def complete_pairing(session: Session, payload: Any) -> None:
    gw = session.gw
    limits = gw.limits
    max_per_connection = gw.config.pairing.max_failures_per_connection
    code = payload.get("pairing_code") if isinstance(payload, dict) else None
    if not isinstance(code, str) or not CODE_FORMAT.fullmatch(code):
        session.conn.send(_failed("Invalid pairing code format"))
        return
    peer = session.conn.peer
    cfg = gw.config.pairing
    # Check and charge before anything is awaited, so concurrent attempts cannot overshoot a limit: this
    # connection's and this instance's budgets here, every instance's in the store's one step below.
    if session.pairing_failures >= max_per_connection or not limits.pairing_failures_per_ip.take(peer):
        _lock_out(session)
        return
    if not limits.pairing_failures.take(GLOBAL_KEY):
        _deployment_lockout(session)
        return
    session.pairing_failures += 1  # given back below unless the code was wrong
    try:
        result = await gw.store.complete_pairing(
            code, session.device_id, gw.config.limits.max_devices_per_user, peer,
            (cfg.max_failures_per_ip_per_hour, cfg.max_failures_per_minute),
        )
    except StoreUnavailable:
        _not_a_failure(session, peer)  # nothing was tried
        session.conn.send(_failed(STORE_FAILED))
        return
    if result.outcome is Pairing.LOCKED_PEER:
        _lock_out(session)
        return
    if result.outcome is Pairing.LOCKED_DEPLOYMENT:
        _deployment_lockout(session)
        return
    if result.outcome is Pairing.NOT_FOUND:
        session.conn.send(_failed(NOT_FOUND))
        if session.pairing_failures >= max_per_connection:
            _lock_out(session)
        return
    _not_a_failure(session, peer)
    if result.outcome is Pairing.USED:
        session.conn.send(_failed(NOT_FOUND))
        return
    if result.outcome is Pairing.LIMIT:
        session.conn.send(_failed(ACCOUNT_FULL))
        return
    assert result.device is not None
    old_user = session.user_id
    if result.outcome is Pairing.OK:
        await session.switch_user(result.device)
    completed = {"success": True, "linkedUserId": result.user_id, "last_ack_device_seq": result.last_ack_device_seq}
    session.conn.send(encode({"type": "pairing_completed", "payload": completed}))
    if result.outcome is Pairing.OK:
        audit(gw, "device_paired", actor=session.device_id, target=result.user_id, peer=session.conn.peer,
              detail=f"from user {old_user[:8]}")
        paired = {
            "type": "device_paired",
            "device_id": session.device_id,
            "device_name": result.device.device_name or "Unknown Device",
            "timestamp": gw.clock.now_ms(),
        }
        await session.publish("device_paired", {"type": "device_paired", "payload": paired})
        await session.announce(online=False, user_id=old_user)
