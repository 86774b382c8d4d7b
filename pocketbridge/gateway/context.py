"""What every connection of the gateway shares: config, clock, identity, store, bus, hub, metrics."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import attrs
import trio

from ..bus import Bus
from ..clock import Clock
from ..config import Config
from ..hub import Hub
from ..limits import Counter, KeyedBuckets, carry_over, parse_networks
from ..metrics import Metrics
from ..protocol.handshake import ServerIdentity
from ..store import Store
from .admission import AcceptGate


@attrs.define
class HttpLimits:
    unauthenticated: KeyedBuckets
    auth_failures: KeyedBuckets
    per_device: KeyedBuckets
    tokens: KeyedBuckets
    device_mutations: KeyedBuckets
    account_deletions: KeyedBuckets
    admin: KeyedBuckets
    admin_failures: KeyedBuckets

    @classmethod
    def from_config(cls, config: Config) -> HttpLimits:
        h, a = config.http, config.admin
        return cls(
            unauthenticated=KeyedBuckets(h.unauthenticated_per_ip_per_minute, 60.0),
            auth_failures=KeyedBuckets(h.auth_failures_per_ip_per_minute, 60.0),
            per_device=KeyedBuckets(h.requests_per_device_per_minute, 60.0),
            tokens=KeyedBuckets(h.token_requests_per_device_per_minute, 60.0),
            device_mutations=KeyedBuckets(h.device_mutations_per_user_per_minute, 60.0),
            account_deletions=KeyedBuckets(h.account_deletions_per_user_per_hour, 3600.0),
            admin=KeyedBuckets(a.requests_per_ip_per_minute, 60.0),
            admin_failures=KeyedBuckets(a.auth_failures_per_ip_per_minute, 60.0),
        )


@attrs.define
class Limits:
    """The abuse limits of §7 and §9 held by this instance (token buckets and live counts)."""

    trusted_proxies: tuple[IPv4Network | IPv6Network, ...]
    connections_per_ip: Counter
    connects_per_ip: KeyedBuckets
    handshakes_per_ip: KeyedBuckets
    events_per_user: KeyedBuckets
    pairing_initiations: KeyedBuckets  # per device
    pairing_failures_per_ip: KeyedBuckets
    pairing_failures: KeyedBuckets  # deployment-wide, one key
    http: HttpLimits

    @classmethod
    def from_config(cls, config: Config, previous: Limits | None = None) -> Limits:
        lim, pairing = config.limits, config.pairing
        fresh = cls(
            trusted_proxies=parse_networks(config.server.trusted_proxies),
            connections_per_ip=Counter(),
            connects_per_ip=KeyedBuckets(lim.ws_connects_per_ip_per_minute, 60.0),
            handshakes_per_ip=KeyedBuckets(lim.handshakes_per_ip_per_minute, 60.0),
            events_per_user=KeyedBuckets(lim.events_per_user_per_minute, 60.0, lim.event_burst_per_user),
            pairing_initiations=KeyedBuckets(pairing.initiations_per_device_per_hour, 3600.0),
            pairing_failures_per_ip=KeyedBuckets(pairing.max_failures_per_ip_per_hour, 3600.0),
            pairing_failures=KeyedBuckets(pairing.max_failures_per_minute, 60.0, max_keys=1),
            http=HttpLimits.from_config(config),
        )
        return fresh if previous is None else carry_over(fresh, previous)


class ConnectionSet(set[Any]):
    """The open WebSocket connections of this instance; the drain waits for it to empty."""

    def __init__(self) -> None:
        super().__init__()
        self._empty = trio.Event()
        self._empty.set()

    def add(self, item: Any) -> None:
        super().add(item)
        if self._empty.is_set():
            self._empty = trio.Event()

    def discard(self, item: Any) -> None:
        super().discard(item)
        if not self:
            self._empty.set()

    async def wait_empty(self) -> None:
        while self:  # a connection may come and go between the wake-up and this check
            await self._empty.wait()


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
    draining: bool = False  # set when an orderly stop begins; readiness answers 503
    connections: ConnectionSet = attrs.field(factory=lambda: ConnectionSet())  # every open WebSocket connection
    stop_accepting: Callable[[], None] = lambda: None  # set by the listener
    gate: AcceptGate = attrs.field(factory=lambda: AcceptGate(1024, 1 << 30))  # replaced by the listener
    http_done: trio.Event = attrs.field(factory=trio.Event)  # set when the HTTP server has stopped

    def __attrs_post_init__(self) -> None:
        self.token_key = self.identity.token_key()
