"""What every connection of the gateway shares: config, clock, identity, store, bus, hub, metrics."""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network

import attrs

from ..bus import Bus
from ..clock import Clock
from ..config import Config
from ..hub import Hub
from ..limits import Counter, KeyedBuckets, parse_networks
from ..metrics import Metrics
from ..protocol.handshake import ServerIdentity
from ..store import Store


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

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        lim, pairing = config.limits, config.pairing
        return cls(
            trusted_proxies=parse_networks(config.server.trusted_proxies),
            connections_per_ip=Counter(),
            connects_per_ip=KeyedBuckets(lim.ws_connects_per_ip_per_minute, 60.0),
            handshakes_per_ip=KeyedBuckets(lim.handshakes_per_ip_per_minute, 60.0),
            events_per_user=KeyedBuckets(lim.events_per_user_per_minute, 60.0, lim.event_burst_per_user),
            pairing_initiations=KeyedBuckets(pairing.initiations_per_device_per_hour, 3600.0),
            pairing_failures_per_ip=KeyedBuckets(pairing.max_failures_per_ip_per_hour, 3600.0),
            pairing_failures=KeyedBuckets(pairing.max_failures_per_minute, 60.0, max_keys=1),
        )


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

    def __attrs_post_init__(self) -> None:
        self.token_key = self.identity.token_key()
