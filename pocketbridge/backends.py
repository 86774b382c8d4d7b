"""The configured store and bus backends (one place that knows every backend; the interfaces do not).

PostgreSQL and Redis are imported only when configured: the embedded default never loads psycopg, redis
or what they pull in (tens of MB of resident memory, and start-up time, for nothing)."""

from __future__ import annotations

from .bus import Bus
from .bus.memory import MemoryBus
from .clock import Clock
from .config import Config
from .store import Store
from .store.sqlite import SqliteStore


def open_store(config: Config, clock: Clock, instance_id: str) -> Store:
    """The configured store (not yet running: start it with ``nursery.start(store.run, hook)``)."""
    if config.storage.backend == "sqlite":
        return SqliteStore(config, clock)
    from .store.postgres import PostgresStore

    return PostgresStore(config, clock, instance_id)


def open_bus(config: Config, instance_id: str) -> Bus:
    """The configured bus (not yet running)."""
    if config.bus.backend == "memory":
        return MemoryBus()
    from .bus.redis import RedisBus

    return RedisBus(config.bus.url, instance_id)
