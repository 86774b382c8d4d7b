"""Who is connected to this instance: user -> live sessions, device -> its one live session.

The hub subscribes to a user's fan-out while it has at least one session of that user here, and
hands every bus message to that user's sessions. Handing over never blocks: a session queues what
it sends in its own bounded outbox (and is closed with 1013 when that is full).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import trio

from .bus import Bus, BusMessage, Control, EventNotice
from .store import DeviceState
from .tracing import span_under


class Member(Protocol):
    user_id: str
    device_id: str
    connection_id: str

    def on_bus(self, message: BusMessage) -> None: ...

    def catch_up(self, head: int) -> None: ...

    def tick(self, now: float) -> None: ...

    def replaced(self) -> None: ...

    @property
    def is_live(self) -> bool:
        """Established and marked online in the store (before that, the store may name an older connection)."""


class Hub:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._users: dict[str, set[Member]] = {}
        self._devices: dict[str, Member] = {}
        self._subscription_lock = trio.Lock()

    def members(self) -> tuple[Member, ...]:
        """Every session here (a snapshot)."""
        return tuple(self._devices.values())

    @property
    def users(self) -> list[str]:
        return list(self._users)

    def user_sessions(self, user_id: str) -> frozenset[Member]:
        return frozenset(self._users.get(user_id, ()))

    async def _join(self, member: Member, user_id: str) -> None:
        async with self._subscription_lock:
            if user_id not in self._users:
                await self._bus.subscribe(user_id)
                self._users[user_id] = set()
            self._users[user_id].add(member)

    async def _leave(self, member: Member, user_id: str) -> None:
        members = self._users.get(user_id)
        if members is None:
            return
        members.discard(member)
        if not members:
            async with self._subscription_lock:
                if not self._users.get(user_id):
                    self._users.pop(user_id, None)
                    await self._bus.unsubscribe(user_id)

    async def attach(self, member: Member) -> None:
        """Subscribe to the member's user (first one here), then close the device's older session."""
        await self._join(member, member.user_id)
        previous = self._devices.get(member.device_id)
        self._devices[member.device_id] = member
        if previous is not None and previous is not member:
            previous.replaced()

    async def detach(self, member: Member) -> None:
        """Forget the member; touches nothing that belongs to a newer session of the same device."""
        if self._devices.get(member.device_id) is member:
            del self._devices[member.device_id]
        await self._leave(member, member.user_id)

    async def move(self, member: Member, old_user_id: str) -> None:
        """The member's device was paired into ``member.user_id``: subscribe there, then leave the old user."""
        await self._join(member, member.user_id)
        await self._leave(member, old_user_id)

    def dispatch(self, message: BusMessage) -> None:
        if isinstance(message, Control) and message.kind == "takeover":
            if message.device_id is not None and message.connection_id is not None:
                self.takeover(message.device_id, message.connection_id)
            return
        members = tuple(self._users.get(message.user_id, ()))
        if isinstance(message, EventNotice):
            # a child of the publishing span, on this instance or (its context in the message) another one
            with span_under(message.trace, "relay.deliver", sessions=len(members)):
                for member in members:
                    member.on_bus(message)
            return
        for member in members:
            member.on_bus(message)

    def enforce(self, device_ids: Iterable[str], states: Mapping[str, DeviceState]) -> int:
        """Apply what the store says to the sessions here, whatever the bus delivered or lost: a revoked
        device, a deleted account or a newer connection of the device elsewhere closes the session. Returns
        how many sessions were closed."""
        closed = 0
        for device_id in device_ids:
            member = self._devices.get(device_id)
            if member is None:
                continue
            state = states.get(device_id)
            if state is None or state.deleting:
                member.on_bus(Control("user_deleted", member.user_id))
            elif state.user_id != member.user_id:
                continue  # paired into another account meanwhile: the pairing itself moves the session
            elif state.revoked:
                reason = state.revoke_reason or "Device revoked"
                member.on_bus(Control("revoke", member.user_id, member.device_id, data={"reason": reason}))
            elif member.is_live and state.connection_id is not None and state.connection_id != member.connection_id:
                member.replaced()
            else:
                continue
            closed += 1
        return closed

    def takeover(self, device_id: str, connection_id: str) -> None:
        """A newer connection of ``device_id`` was established elsewhere: close ours."""
        member = self._devices.get(device_id)
        if member is not None and member.connection_id != connection_id:
            member.replaced()
