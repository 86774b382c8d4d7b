"""Device revocation and account deletion (§8): the mechanism behind the REST and admin endpoints."""

from __future__ import annotations

import trio

from .audit import audit
from .bus import Control
from .gateway.context import Gateway
from .store import DeletedCounts, Device

USER_REVOKED = "Device has been removed by user"
ADMIN_REVOKED = "Device revoked by administrator"
ACCOUNT_CLOSE_WAIT = 1.0  # seconds the local sessions get to close before the data goes


async def revoke_device(
    gw: Gateway, device_id: str, reason: str, user_id: str | None = None, *, actor: str | None = None,
    peer: str | None = None,
) -> Device | None:
    """Record the revocation, then tell every instance to close the device's connection.

    Returns the device as it was before, or None if it is unknown (or not in ``user_id``)."""
    device = await gw.store.revoke_device(device_id, reason, user_id)
    if device is not None:
        audit(gw, "device_revoked", actor=actor, target=device_id, peer=peer, detail=reason)
        await gw.bus.publish([Control("revoke", device.user_id, device_id, data={"reason": reason})])
    return device


async def delete_user(
    gw: Gateway, user_id: str, *, actor: str | None = None, peer: str | None = None
) -> DeletedCounts | None:
    """Mark the user deleting, close its connections everywhere, then delete its data in one transaction."""
    if not await gw.store.mark_deleting(user_id):
        return None
    audit(gw, "account_deleted", actor=actor, target=user_id, peer=peer)
    await gw.bus.publish([Control("user_deleted", user_id)])
    with trio.move_on_after(ACCOUNT_CLOSE_WAIT):
        while gw.hub.user_sessions(user_id):
            await trio.sleep(0.01)
    return await gw.store.delete_user(user_id)
