"""Shared fixtures: an in-process daemon on ephemeral loopback ports, stopped after each test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from pocketbridge.app import Daemon, Running
from pocketbridge.config import Config, load_config, with_overrides

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The machine's PostgreSQL and Redis (CI has them too). Each test session gets its own database.
PG_ADMIN_DSN = os.environ.get("PB_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_config(data_dir: Path, **sections: dict[str, Any]) -> Config:
    """Defaults + a private data dir + ephemeral loopback ports, then the given overrides."""
    base = with_overrides(
        load_config(None, env={}),
        server={"data_dir": str(data_dir)},
        listen={"ws": "127.0.0.1:0", "http": "127.0.0.1:0"},
        drain={"window": 0.2, "deadline": 10},
        storage={"batch_linger": 0},  # tests on trio's MockClock must not wait on timers
    )
    return with_overrides(base, **sections) if sections else base


def _with_dsn(dsn: str, dbname: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + dbname


@contextmanager
def temporary_database(prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A new database on the machine's PostgreSQL (migrated unless told), dropped after; skips if unreachable."""
    import psycopg

    from pocketbridge.store.postgres import migrate

    name = f"pocketbridge_{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_DSN}: {type(exc).__name__}")
    dsn = _with_dsn(PG_ADMIN_DSN, name)
    try:
        if migrated:
            migrate(dsn)
        yield dsn
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A fresh, migrated database on the machine's PostgreSQL for this test session (dropped after)."""
    with temporary_database("test") as dsn:
        yield dsn


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"Redis is not reachable at {REDIS_URL}: {type(exc).__name__}")
    return REDIS_URL


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis]),
    ]
)
def backend(request: pytest.FixtureRequest) -> dict[str, dict[str, Any]]:
    """Config sections selecting a backend: the embedded default, or PostgreSQL + Redis."""
    if request.param == "sqlite":
        return {}
    dsn = request.getfixturevalue("postgres_dsn")
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as db:  # every client here is 127.0.0.1: no carried-over
        db.execute("TRUNCATE pairing_failures")  # pairing failures from earlier tests
    return {
        "storage": {"backend": "postgres", "dsn": dsn},
        "bus": {"backend": "redis", "url": request.getfixturevalue("redis_url")},
    }


@asynccontextmanager
async def run_daemon(config: Config) -> AsyncIterator[tuple[Daemon, Running]]:
    """Start a daemon in this trio run; stop it (orderly) on exit."""
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        running: Running = await nursery.start(daemon.run)
        try:
            yield daemon, running
        finally:
            daemon.stop()


@pytest.fixture
def config_factory(tmp_path: Path, backend: dict[str, dict[str, Any]]) -> Callable[..., Config]:
    """Builds configs for this test's backend (every e2e test runs on both backends)."""

    def factory(**sections: dict[str, Any]) -> Config:
        merged = {name: {**backend.get(name, {}), **sections.get(name, {})} for name in {*backend, *sections}}
        return make_config(tmp_path / "data", **merged)

    return factory


@pytest.fixture
async def daemon(config_factory: Callable[..., Config]) -> AsyncIterator[Running]:
    """A running daemon with default settings; yields its ``Running`` (ws_url, identity …)."""
    async with run_daemon(config_factory()) as (_, running):
        yield running


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    """Under CI=true a skipped PostgreSQL or Redis test is a failure, not a pass."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and any(any(item.iter_markers(name)) for name in ("postgres", "redis")):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: skipped under CI=true ({report.longrepr}); PostgreSQL/Redis tests must run in CI"
