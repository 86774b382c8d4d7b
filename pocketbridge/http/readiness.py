"""Whether this instance can serve: store and bus round trips, cached for a few seconds (§10.3)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from ..store import Store


class Pingable(Protocol):
    async def ping(self) -> None: ...


class Readiness:
    def __init__(self, store: Store, bus: Pingable, cache_seconds: float, probe_timeout: float) -> None:
        self._store = store
        self._bus = bus
        self._cache_seconds = cache_seconds
        self._probe_timeout = probe_timeout
        self._checked_at = -math.inf
        self._services: dict[str, str] = {}

    async def services(self, fresh: bool = False) -> dict[str, str]:
        """``{"database": state, "bus": state}``; a state is "connected" or what is wrong."""
        if fresh or trio.current_time() - self._checked_at > self._cache_seconds:
            store = self._store
            database = await self._probe(store.ping)
            if database == "connected" or store.write_failing == "storage_full":  # reads work: say if writes do not
                database = store.write_failing or ("storage_low" if store.space_low() else database)
            self._services = {"database": database, "bus": await self._probe(self._bus.ping)}
            self._checked_at = trio.current_time()
        return self._services

    async def _probe(self, ping: Callable[[], Awaitable[None]]) -> str:
        with trio.move_on_after(self._probe_timeout):
            try:
                await ping()
                return "connected"
            except Exception:
                return "disconnected"
        return "disconnected"
