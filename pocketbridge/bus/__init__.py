"""Fan-out between connections (and, with Redis, between instances), behind one small interface.

The bus is a wake-up, the store is the truth: an :class:`EventNotice` tells a user's connections
that ``server_seq`` was committed (carrying the encoded event so the common case needs no read);
a connection that sees a gap re-reads the missing sequence numbers from the store. Control messages
carry presence, connection takeover and (later) revocation and account deletion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs


@attrs.frozen
class EventNotice:
    user_id: str
    server_seq: int
    device_id: str  # the sender
    event_id: str
    device_seq: int
    ttl: int | None
    wire: str  # the encoded `event` message, shared by every recipient ("" = read it from the store)
    created_at: int = 0  # commit time (ms), for the delivery-latency metric
    # the W3C trace context of the publishing span, while tracing is on (tracing.trace_context()): the
    # delivery span on the receiving instance is its child, so a relay is one trace across instances
    trace: dict[str, str] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Control:
    """A control message for the connections of ``user_id``.

    kinds: ``presence`` (data: the device_status_changed payload), ``takeover`` (a new connection of
    ``device_id`` was established; others must close), and those added by later features.
    """

    kind: str
    user_id: str
    device_id: str | None = None
    connection_id: str | None = None
    data: dict[str, Any] = attrs.field(factory=dict)


BusMessage = EventNotice | Control
Sink = Callable[[BusMessage], None]


class LocalDelivery:
    """What every bus does on its own instance: keep the users subscribed here and hand their
    messages to the hub's sink."""

    def __init__(self) -> None:
        self._sink: Sink | None = None
        self._subscribed: set[str] = set()

    async def subscribe(self, user_id: str) -> None:
        self._subscribed.add(user_id)

    async def unsubscribe(self, user_id: str) -> None:
        self._subscribed.discard(user_id)

    def deliver(self, message: BusMessage) -> None:
        if self._sink is not None and message.user_id in self._subscribed:
            self._sink(message)


class Bus(Protocol):
    connected: bool  # the fan-out between instances works (always True for the in-process bus)
    spans_instances: bool  # messages reach other instances (False for the in-process bus)

    async def run(self, sink: Sink, *, task_status: Any = ...) -> None:
        """Deliver subscribed users' messages to ``sink`` (never blocking in it) until cancelled."""

    async def subscribe(self, user_id: str) -> None:
        """Returns once messages for ``user_id`` published from now on will reach the sink."""

    async def unsubscribe(self, user_id: str) -> None: ...

    async def publish(self, messages: Sequence[BusMessage]) -> None:
        """Publish in order; raises BusUnavailable (delivery then falls back to the store)."""

    async def ping(self) -> None: ...
