"""What every connection of the gateway shares: config, clock, identity, store, bus, hub, metrics."""

from __future__ import annotations

import attrs

from ..bus import Bus
from ..clock import Clock
from ..config import Config
from ..hub import Hub
from ..limits import KeyedBuckets
from ..metrics import Metrics
from ..protocol.handshake import ServerIdentity
from ..store import Store


@attrs.define
class Limits:
    events_per_user: KeyedBuckets

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        lim = config.limits
        return cls(events_per_user=KeyedBuckets(lim.events_per_user_per_minute, 60.0, lim.event_burst_per_user))


@attrs.define
class Gateway:
    config: Config
    clock: Clock
    identity: ServerIdentity
    store: Store
    bus: Bus
    hub: Hub
    metrics: Metrics
    limits: Limits
    instance_id: str
    token_key: bytes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.token_key = self.identity.token_key()
