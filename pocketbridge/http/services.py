"""What the HTTP side uses, handed to :func:`pocketbridge.http.app.create_app` by the daemon.

Route handlers reach it through Quart's ``current_app`` (:func:`services`, :func:`state`), never through the
WebSocket side. Config and limits are read per request: a reload (SIGHUP) replaces both.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol, cast

import attrs
from quart import current_app

from ..accounts import Accounts, Auditor
from ..clock import Clock
from ..config import Config
from ..limits import KeyedBuckets
from ..metrics import Metrics
from ..protocol.handshake import ServerIdentity
from ..store import Store
from .auth import Authenticator
from .readiness import Pingable, Readiness

STATE_KEY = "pocketbridge"  # in app.extensions


class HttpBuckets(Protocol):
    """The HTTP rate limits of §10.1 and §10.4."""

    @property
    def unauthenticated(self) -> KeyedBuckets: ...  # per address

    @property
    def auth_failures(self) -> KeyedBuckets: ...  # per address

    @property
    def per_device(self) -> KeyedBuckets: ...

    @property
    def tokens(self) -> KeyedBuckets: ...  # per device

    @property
    def device_mutations(self) -> KeyedBuckets: ...  # per user

    @property
    def account_deletions(self) -> KeyedBuckets: ...  # per user

    @property
    def admin(self) -> KeyedBuckets: ...  # per address

    @property
    def admin_failures(self) -> KeyedBuckets: ...  # per address


class RateLimits(Protocol):
    @property
    def trusted_proxies(self) -> tuple[IPv4Network | IPv6Network, ...]: ...  # whose X-Forwarded-For counts (§9)

    @property
    def http(self) -> HttpBuckets: ...


@attrs.frozen(kw_only=True)
class HttpServices:
    store: Store
    bus: Pingable  # probed for readiness
    clock: Clock
    identity: ServerIdentity  # signs bearer tokens
    metrics: Metrics
    accounts: Accounts  # revocation and account deletion
    current_config: Callable[[], Config]
    current_limits: Callable[[], RateLimits]
    is_draining: Callable[[], bool]  # an orderly stop has begun
    audit: Auditor = attrs.field(init=False)

    @audit.default
    def _audit(self) -> Auditor:
        return Auditor(self.store, self.clock)

    @property
    def config(self) -> Config:
        return self.current_config()

    @property
    def limits(self) -> RateLimits:
        return self.current_limits()

    @property
    def draining(self) -> bool:
        return self.is_draining()

    def authenticator(self) -> Authenticator:
        return Authenticator(self.store, self.clock, self.identity.public_hex, self.config.limits.clock_skew)


@attrs.frozen
class AppState:
    """What an app's routes share: the services, the app's readiness cache and when the app started."""

    services: HttpServices
    readiness: Readiness
    started: float  # trio time


def state() -> AppState:
    return cast(AppState, current_app.extensions[STATE_KEY])


def services() -> HttpServices:
    return state().services
