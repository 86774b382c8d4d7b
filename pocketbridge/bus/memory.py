"""The in-process bus of the embedded default: publish hands messages straight to the sink."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from . import BusMessage, Sink


class MemoryBus:
    connected = True
    spans_instances = False

    def __init__(self) -> None:
        self._sink: Sink | None = None
        self._subscribed: set[str] = set()

    async def run(self, sink: Sink, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._sink = sink
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._sink = None

    async def subscribe(self, user_id: str) -> None:
        self._subscribed.add(user_id)

    async def unsubscribe(self, user_id: str) -> None:
        self._subscribed.discard(user_id)

    async def publish(self, messages: Sequence[BusMessage]) -> None:
        sink = self._sink
        if sink is None:
            return
        for message in messages:
            if message.user_id in self._subscribed:
                sink(message)

    async def ping(self) -> None:
        return None
