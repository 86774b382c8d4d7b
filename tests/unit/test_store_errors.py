"""Each backend maps its driver's exceptions in one place: SQLite and psycopg errors become StoreUnavailable,
or StorageFull when the disk is full; what a read does not map (a bug, bad input) is not an outage."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from pocketbridge.clock import Clock
from pocketbridge.errors import StorageFull, StoreUnavailable
from pocketbridge.store.postgres import UNAVAILABLE, map_errors
from pocketbridge.store.sqlite import SqliteStore
from tests.conftest import make_config


def sqlite_error(code: int) -> sqlite3.Error:
    error = sqlite3.OperationalError("boom")
    error.sqlite_errorcode = code
    return error


@pytest.mark.parametrize(
    ("code", "free", "expected"),
    [
        (sqlite3.SQLITE_FULL, 1 << 40, StorageFull),
        (sqlite3.SQLITE_IOERR | (4 << 8), 0, StorageFull),  # an I/O error on a full filesystem: ENOSPC
        (sqlite3.SQLITE_IOERR | (4 << 8), 1 << 40, StoreUnavailable),
        (sqlite3.SQLITE_BUSY, 0, StoreUnavailable),
    ],
)
def test_sqlite_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, free: int, expected: type[Exception]
) -> None:
    store = SqliteStore(make_config(tmp_path), Clock())
    monkeypatch.setattr(store, "free_bytes", lambda *, fresh=False: free)
    with pytest.raises(expected) as raised, store._errors("write failed"):
        raise sqlite_error(code)
    assert type(raised.value) is expected and str(raised.value).startswith("write failed: ")
    assert isinstance(raised.value.__cause__, sqlite3.Error)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (psycopg.errors.DiskFull("no space"), StorageFull),
        (psycopg.OperationalError("gone"), StoreUnavailable),
        (PoolTimeout("no connection"), StoreUnavailable),
        (psycopg.errors.UniqueViolation("taken"), StoreUnavailable),
    ],
)
def test_postgres_errors(error: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected) as raised, map_errors("commit failed"):
        raise error
    assert type(raised.value) is expected and raised.value.__cause__ is error
    assert "sqlstate" in str(raised.value) and "taken" not in str(raised.value)  # never a value from a row


def test_a_read_maps_only_unavailability() -> None:
    with pytest.raises(psycopg.DataError), map_errors("PostgreSQL unavailable", UNAVAILABLE):
        raise psycopg.errors.NumericValueOutOfRange("out of range")


class ScriptedBatch:
    """``PostgresStore._apply_batch`` around a scripted ``_apply_batch_once``: each attempt raises the next
    exception of ``script`` (None: the batch commits)."""

    def __init__(self, *script: BaseException | None) -> None:
        self.script = list(script)
        self.attempts = 0

    def _apply_batch_once(self, batch: object, now_ms: int) -> list[object]:
        self.attempts += 1
        failure = self.script.pop(0)
        if failure is not None:
            raise failure
        return []


def deadlock_victim() -> StoreUnavailable:
    with pytest.raises(StoreUnavailable) as caught, map_errors("commit failed"):
        raise psycopg.errors.DeadlockDetected("deadlock detected")
    return caught.value


def test_a_batch_redone_after_a_deadlock_may_still_end_a_chain() -> None:
    """A deadlock victim is tried again once; that attempt may find a connection's chain ended inside the
    batch (ChainEnded): the batch is redone without its later events, not failed."""
    from pocketbridge.store.postgres import ChainEnded, PostgresStore

    scripted = ScriptedBatch(deadlock_victim(), ChainEnded(), None)
    batch: Any = [object(), object()]
    assert PostgresStore._apply_batch(scripted, batch, 0) == []  # type: ignore[arg-type]
    assert scripted.attempts == 3
    again = ScriptedBatch(ChainEnded(), deadlock_victim(), deadlock_victim())
    with pytest.raises(StoreUnavailable):  # a second deadlock fails the batch
        PostgresStore._apply_batch(again, batch, 0)  # type: ignore[arg-type]
