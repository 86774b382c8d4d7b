"""Device revocation and account deletion (§8): the mechanism behind the REST and admin endpoints.

:class:`Accounts` is handed what it uses: the store, the bus that tells every instance, the sessions of a
user on this instance, and the audit trail. The module functions serve a holder of those parts (the daemon's
gateway is one).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

import attrs
import trio

from .audit import Auditor
from .bus import Bus, Control
from .clock import Clock
from .store import DeletedCounts, Device, Store

USER_REVOKED = "Device has been removed by user"
ADMIN_REVOKED = "Device revoked by administrator"
ACCOUNT_CLOSE_WAIT = 1.0  # seconds the local sessions get to close before the data goes
SESSION_POLL = 0.01  # seconds between looks at the sessions still open meanwhile


class SessionIndex(Protocol):
    def user_sessions(self, user_id: str) -> Collection[object]: ...


class AccountParts(Protocol):
    """What :meth:`Accounts.of` builds from (the daemon's gateway has these)."""

    @property
    def store(self) -> Store: ...

    @property
    def bus(self) -> Bus: ...

    @property
    def hub(self) -> SessionIndex: ...

    @property
    def clock(self) -> Clock: ...


@attrs.frozen
class Accounts:
    store: Store
    bus: Bus
    sessions: Callable[[str], Collection[object]]  # a user's open sessions on this instance
    audit: Auditor

    @classmethod
    def of(cls, parts: AccountParts) -> Accounts:
        return cls(parts.store, parts.bus, parts.hub.user_sessions, Auditor(parts.store, parts.clock))

    async def revoke_device(
        self, device_id: str, reason: str, user_id: str | None = None, *, actor: str | None = None,
        peer: str | None = None,
    ) -> Device | None:
        """Record the revocation, then tell every instance to close the device's connection.

        Returns the device as it was before, or None if it is unknown (or not in ``user_id``)."""
        device = await self.store.revoke_device(device_id, reason, user_id)
        if device is not None:
            self.audit("device_revoked", actor=actor, target=device_id, peer=peer, detail=reason)
            await self.bus.publish([Control("revoke", device.user_id, device_id, data={"reason": reason})])
        return device

    async def delete_user(
        self, user_id: str, *, actor: str | None = None, peer: str | None = None
    ) -> DeletedCounts | None:
        """Mark the user deleting, close its connections everywhere, then delete its data.

        The mark is the fence: once it has committed, the store refuses every event and handshake of the
        user on every instance (``deleting``, under the user's row lock), so sessions elsewhere need not be
        waited for — they cannot add anything the deletion would miss, and each instance closes them from
        the bus or, with the bus down, from the store on its next catch-up poll. Local sessions get
        ACCOUNT_CLOSE_WAIT to close first, so their last acks go out before the data goes."""
        if not await self.store.mark_deleting(user_id):
            return None
        self.audit("account_deleted", actor=actor, target=user_id, peer=peer)
        await self.bus.publish([Control("user_deleted", user_id)])
        with trio.move_on_after(ACCOUNT_CLOSE_WAIT):
            await self._sessions_closed(user_id)
        return await self.store.delete_user(user_id)

    async def _sessions_closed(self, user_id: str) -> None:
        # The hub announces no "last session of a user left"; until it does, look again and again.
        while self.sessions(user_id):  # noqa: ASYNC110
            await trio.sleep(SESSION_POLL)


async def revoke_device(
    parts: AccountParts, device_id: str, reason: str, user_id: str | None = None, *, actor: str | None = None,
    peer: str | None = None,
) -> Device | None:
    """:meth:`Accounts.revoke_device` with the accounts of ``parts``."""
    return await Accounts.of(parts).revoke_device(device_id, reason, user_id, actor=actor, peer=peer)


async def delete_user(
    parts: AccountParts, user_id: str, *, actor: str | None = None, peer: str | None = None
) -> DeletedCounts | None:
    """:meth:`Accounts.delete_user` with the accounts of ``parts``."""
    return await Accounts.of(parts).delete_user(user_id, actor=actor, peer=peer)
