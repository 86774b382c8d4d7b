"""PostgreSQL lock order between instances (issue: one deadlock per two-instance closed-loop run).

Two instances write the same rows in one batch transaction each: an event append locks its user's row
and then its device's row; the writer's coalesced flush (delivery cursors, ``last_seen``) must never
wait on either in an order that closes a cycle. These tests replay the interleaving that PostgreSQL
reported as a deadlock, on two real connections, and require both transactions to commit.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence

import psycopg
import pytest

from pocketbridge.protocol.events import NewEvent
from pocketbridge.store import rules
from pocketbridge.store.postgres import PgTx
from tests.conftest import temporary_database

pytestmark = pytest.mark.postgres
NOW = 1_700_000_000_000


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with temporary_database("locks") as dsn:
        yield dsn


def new_device(c: psycopg.Connection, user: str) -> str:
    device = str(uuid.uuid4())
    c.execute(
        "INSERT INTO users (user_id, created_at) VALUES (%s, now()) ON CONFLICT DO NOTHING", (user,)
    )
    c.execute(
        "INSERT INTO devices (device_id, user_id, bound_key, registered_at) VALUES (%s, %s, %s, now())",
        (device, user, user),
    )
    return device


def event(user: str, device: str, seq: int) -> NewEvent:
    return NewEvent(
        user_id=user, event_id=str(uuid.uuid4()), device_id=device, device_seq=seq, stream_id="s", type="t",
        encrypted_payload="eA==", payload_size=1, ttl=None,
    )


def connect(dsn: str) -> psycopg.Connection:
    c = psycopg.connect(dsn, autocommit=False, connect_timeout=5)
    c.execute("SET lock_timeout = '10s'")  # a wait that never ends fails the test instead of hanging it
    return c


class Appender(threading.Thread):
    """The other instance: one batch appending ``events``; commits, or records what failed."""

    def __init__(self, dsn: str, events: list[NewEvent]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.events = dsn, events
        self.error: BaseException | None = None
        self.started_first = threading.Event()

    def run(self) -> None:
        try:
            with connect(self.dsn) as c:
                tx = PgTx(c, "other", (0, 0))
                for i, ev in enumerate(self.events):
                    tx.append(ev, NOW)
                    if i == 0:
                        self.started_first.set()
                c.commit()
        except BaseException as exc:
            self.error = exc
        finally:
            self.started_first.set()


def waiting_on_lock(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0])


def wait_until_blocked(dsn: str) -> None:
    deadline = time.monotonic() + 10
    while not waiting_on_lock(dsn):
        assert time.monotonic() < deadline, "the other transaction never waited"
        time.sleep(0.02)


class InterleavedTx(PgTx):
    """A flush that lets the other instance's append start between its statements."""

    def __init__(self, c: psycopg.Connection, other: Appender, dsn: str) -> None:
        super().__init__(c, "one", (0, 0))
        self.other, self.dsn = other, dsn

    def touch(self, device_ids: Sequence[str], user_ids: Sequence[str], now_ms: int) -> None:
        self.other.start()
        wait_until_blocked(self.dsn)  # the append holds the user's row and waits for the device's
        super().touch(device_ids, user_ids, now_ms)


def test_flush_after_cursor_moves_does_not_deadlock_with_an_append(dsn: str) -> None:
    """The reported cycle: a flush raises device D's cursor (holds D), an append on another instance
    locks D's user and waits for D, then the flush stamps D's last_seen: a second write of D in one
    transaction makes PostgreSQL check D's user row (FOR KEY SHARE), which the append holds."""
    user = uuid.uuid4().hex + uuid.uuid4().hex
    with connect(dsn) as c:
        device = new_device(c, user)
        c.commit()
        other = Appender(dsn, [event(user, device, 1)])
        skipped = rules.flush(InterleavedTx(c, other, dsn), {device: (user, 5)}, {device: user}, [], NOW)
        c.commit()
        other.join(15)
        assert not other.is_alive()
        assert other.error is None, repr(other.error)
        assert skipped == {}
        row = c.execute("SELECT delivery_cursor, last_seen IS NOT NULL, last_ack_device_seq FROM devices"
                        " WHERE device_id = %s", (device,)).fetchone()
        assert row == (5, True, 1)


def test_flush_never_waits_for_a_device_an_append_holds(dsn: str) -> None:
    """Devices in device-id order against users in user-id order: the flush skips a device row another
    transaction holds (its cursor is written in a later flush) instead of waiting for it."""
    a_user, b_user = sorted(uuid.uuid4().hex * 2 for _ in range(2))
    with connect(dsn) as c:
        a_dev, b_dev = new_device(c, a_user), new_device(c, b_user)
        c.commit()
        # the other instance's batch, in user order: it will hold a_user+a_dev, then wait for b_user's rows
        other = Appender(dsn, [event(a_user, a_dev, 1), event(b_user, b_dev, 1)])
        with connect(dsn) as blocker:  # hold b_user's row so the other batch stops between its two appends
            blocker.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (b_user,))
            other.start()
            wait_until_blocked(dsn)
            # the flush wants both devices: a_dev is held by the other batch
            skipped = rules.flush(PgTx(c, "one", (0, 0)), {a_dev: (a_user, 3), b_dev: (b_user, 4)}, {}, [], NOW)
            c.commit()
            blocker.rollback()
        other.join(15)
        assert other.error is None, repr(other.error)
        assert skipped == {a_dev: (a_user, 3)}
        cursors = dict(c.execute("SELECT device_id, delivery_cursor FROM devices WHERE device_id = ANY(%s)",
                                 ([a_dev, b_dev],)).fetchall())
        assert cursors == {a_dev: 0, b_dev: 4}
