"""The in-process bus of the embedded default: publish hands messages straight to the sink."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from . import BusMessage, LocalDelivery, Sink


class MemoryBus(LocalDelivery):
    connected = True
    spans_instances = False

    async def run(self, sink: Sink, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._sink = sink
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._sink = None

    async def publish(self, messages: Sequence[BusMessage]) -> None:
        # delivered at once, under the publisher's span: the delivery span joins its trace as it is
        for message in messages:
            self.deliver(message)

    async def ping(self) -> None:
        return None
