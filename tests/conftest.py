"""Shared fixtures: an in-process daemon on ephemeral loopback ports, stopped after each test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from pocketbridge.app import Daemon, Running
from pocketbridge.config import Config, load_config, with_overrides

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def make_config(data_dir: Path, **sections: dict[str, Any]) -> Config:
    """Defaults + a private data dir + ephemeral loopback ports, then the given overrides."""
    base = with_overrides(
        load_config(None, env={}),
        server={"data_dir": str(data_dir)},
        listen={"ws": "127.0.0.1:0", "http": "127.0.0.1:0"},
    )
    return with_overrides(base, **sections) if sections else base


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
def config_factory(tmp_path: Path) -> Callable[..., Config]:
    def factory(**sections: dict[str, Any]) -> Config:
        return make_config(tmp_path / "data", **sections)

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
