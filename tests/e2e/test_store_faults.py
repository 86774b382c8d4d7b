"""Faults injected at the store boundary, on both backends (protocol.md §5.2–§5.5).

Each fault is a real one raised by the database itself, installed by the test through its own connection:
a trigger that fails a statement, a deferred constraint that fails the COMMIT, a deferred trigger that makes
the COMMIT slower than ``[storage] op_timeout`` (PostgreSQL), and PostgreSQL's connection cut mid-batch by a
TCP proxy while the batch runs (its outcome is then unknown to the daemon). For each one:

* no ack without storage, no delivery without storage, and no sequence number seen by a client is ever
  given to another event (the receiver's server_seq -> event_id map agrees with the database);
* every acked event is replayable afterwards, and each event reaches the receiver exactly once;
* the daemon recovers without a restart, and ``/health`` says the database is failing while it lasts.

The receiver acks like the web client (``device_seq`` only).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pocketbridge.client import Client, ClientError, DeviceKey, ReceivedEvent, connect, new_device_id, new_event_id
from pocketbridge.config import Config
from tests.conftest import make_config, run_daemon
from tests.e2e.tcpproxy import open_tcp_proxy

STREAM = "clipboard:main"
FAULT_STREAM = "clipboard:fault"  # only events of this stream hit the injected fault
HIGH = {"ws_connects_per_ip_per_minute": 10_000, "handshakes_per_ip_per_minute": 10_000}


# --- faults, as SQL each backend runs through its own connection ----------------------------------------
SQLITE_FAULTS = {
    "statement": [
        f"CREATE TRIGGER pb_fault BEFORE INSERT ON events WHEN NEW.stream_id = '{FAULT_STREAM}'"
        " BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    ],
    "commit": [  # a deferred foreign key: every statement succeeds, the COMMIT fails
        "CREATE TABLE pb_fault_parent (id INTEGER PRIMARY KEY)",
        "CREATE TABLE pb_fault_child (pid INTEGER REFERENCES pb_fault_parent (id) DEFERRABLE INITIALLY DEFERRED)",
        f"CREATE TRIGGER pb_fault AFTER INSERT ON events WHEN NEW.stream_id = '{FAULT_STREAM}'"
        " BEGIN INSERT INTO pb_fault_child VALUES (1); END",
    ],
}
SQLITE_CLEAR = ["DROP TRIGGER IF EXISTS pb_fault", "DROP TABLE IF EXISTS pb_fault_child", "DROP TABLE IF EXISTS pb_fault_parent"]

PG_FUNCTIONS = [
    "CREATE OR REPLACE FUNCTION pb_fault_raise() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN RAISE EXCEPTION 'injected fault'; END $$",
    "CREATE OR REPLACE FUNCTION pb_fault_sleep() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$",
]
PG_FAULTS = {
    "statement": [
        "CREATE TRIGGER pb_fault BEFORE INSERT ON events FOR EACH ROW"
        f" WHEN (NEW.stream_id = '{FAULT_STREAM}') EXECUTE FUNCTION pb_fault_raise()"
    ],
    "commit": [
        "CREATE CONSTRAINT TRIGGER pb_fault AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
        f" WHEN (NEW.stream_id = '{FAULT_STREAM}') EXECUTE FUNCTION pb_fault_raise()"
    ],
    # the COMMIT takes 2 s (op_timeout is 1 s in these tests), then succeeds
    "commit_timeout": [
        "CREATE CONSTRAINT TRIGGER pb_fault AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
        f" WHEN (NEW.stream_id = '{FAULT_STREAM}') EXECUTE FUNCTION pb_fault_sleep()"
    ],
    # the COMMIT takes 2 s; the test cuts the connection meanwhile: the daemon cannot know the outcome
    "connection_lost": [
        "CREATE CONSTRAINT TRIGGER pb_fault AFTER INSERT ON events DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
        f" WHEN (NEW.stream_id = '{FAULT_STREAM}') EXECUTE FUNCTION pb_fault_sleep()"
    ],
}
PG_CLEAR = ["DROP TRIGGER IF EXISTS pb_fault ON events"]
# faults after which the event may be stored although its sender never got an ack
MAY_COMMIT = {"commit_timeout", "connection_lost"}


class Database:
    """The test's own connection to the daemon's database: installs faults and reads the truth."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.postgres = config.storage.backend == "postgres"

    def run(self, statements: list[str]) -> None:
        if self.postgres:
            with psycopg.connect(self._dsn(), autocommit=True, connect_timeout=5) as conn:
                for sql in statements:
                    conn.execute(sql)
        else:
            conn = sqlite3.connect(self.config.sqlite_path(), isolation_level=None, timeout=10)
            try:
                for sql in statements:
                    conn.execute(sql)
            finally:
                conn.close()

    def _dsn(self) -> str:
        dsn = self.config.storage.dsn
        # the daemon may reach PostgreSQL through the test's proxy; the test always goes direct
        return make_conninfo(dsn, host="127.0.0.1", port="5432", dbname=conninfo_to_dict(dsn)["dbname"])

    def events(self, user_id: str) -> dict[tuple[str, int], str]:
        """(stream_id, stream_seq) -> event_id of the user's stored events."""
        sql = "SELECT stream_id, stream_seq, event_id FROM events WHERE user_id = ?"
        if self.postgres:
            with psycopg.connect(self._dsn(), connect_timeout=5) as conn:
                rows = conn.execute(sql.replace("?", "%s"), (user_id,)).fetchall()
        else:
            conn = sqlite3.connect(f"file:{self.config.sqlite_path()}?mode=ro", uri=True, timeout=10)
            try:
                rows = conn.execute(sql, (user_id,)).fetchall()
            finally:
                conn.close()
        return {(stream, int(seq)): eid for stream, seq, eid in rows}


class Receiver:
    """A device that receives live events and acks them like the web client (device_seq only)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[ReceivedEvent] = []

    async def run(self) -> None:
        async for event in self.client.events(ack=True):
            self.seen.append(event)

    async def wait_for(self, event_ids: set[str], timeout: float = 10) -> None:
        with trio.fail_after(timeout):
            while not event_ids <= {e.event_id for e in self.seen}:
                await trio.sleep(0.02)


@asynccontextmanager
async def session(url: str, key: DeviceKey, device_id: str, **kw: Any) -> AsyncIterator[Client]:
    """Connect, retrying while the daemon refuses (1013 while the store's breaker is open); bounded."""
    deadline = trio.current_time() + 15
    async with AsyncExitStack() as stack:
        while True:  # only connecting is retried: an error of the block itself goes to the test
            try:
                client = await stack.enter_async_context(connect(url, key, device_id, reply_timeout=10, **kw))
                break
            except (ClientError, OSError):
                if trio.current_time() > deadline:
                    raise
                await trio.sleep(0.3)
        yield client


async def send_until_answered(client: Client, *, stream: str, payload: bytes, device_seq: int, event_id: str) -> Any:
    """Post one event; its ack, or None if the connection was closed first."""
    try:
        return await client.send_event(stream, "clipboard:text", payload, device_seq=device_seq, event_id=event_id)
    except ClientError:
        return None


async def run_fault_case(
    config: Config, fault: str, install: list[str], clear: list[str], *, during: Callable[[], Any] | None = None
) -> None:
    db = Database(config)
    key = DeviceKey.generate()
    user = key.public_hex
    dev_a, dev_b, dev_c = new_device_id(), new_device_id(), new_device_id()
    async with run_daemon(config) as (_, running), httpx.AsyncClient(timeout=10) as http:
        url = running.ws_url
        async with trio.open_nursery() as nursery, session(url, key, dev_b, ack_event_ids=False) as b:
            receiver = Receiver(b)
            nursery.start_soon(receiver.run)
            acked: dict[str, int] = {}  # event_id -> device_seq, for every "stored"/"duplicate" ack
            async with session(url, key, dev_a) as a:
                ack = await a.send_event(STREAM, "clipboard:text", b"before")
                assert ack.status == "stored"
                acked[ack.event_id] = ack.device_seq
                await receiver.wait_for({ack.event_id})

                # --- the fault ---
                await trio.to_thread.run_sync(db.run, install)
                fault_seq, fault_id = a.next_device_seq(), new_event_id()
                if during is not None:
                    nursery.start_soon(during)
                answer = await send_until_answered(a, stream=FAULT_STREAM, payload=b"faulty", device_seq=fault_seq,
                                                   event_id=fault_id)
                assert answer is None or answer.status != "stored", f"{fault}: acked although the commit failed"
                assert a.close_code == 1013, (fault, a.close_code, a.close_reason)

            if fault not in MAY_COMMIT:
                # /health names the failing database while writes fail
                r = await http.get(f"{running.http_url}/health")
                assert r.status_code == 503, r.text
                assert r.json()["services"]["database"] == "write_failed", r.text
                await trio.sleep(0.5)  # the receiver would have got a phantom by now
                assert fault_id not in {e.event_id for e in receiver.seen}, f"{fault}: delivered without storage"
                assert fault_id not in set((await trio.to_thread.run_sync(db.events, user)).values())

            # --- the fault is gone: without a restart, a third device commits first, then A resends ---
            await trio.to_thread.run_sync(db.run, clear)
            async with session(url, key, dev_c) as c:
                ack = await c.send_event(STREAM, "clipboard:text", b"from c")
                assert ack.status == "stored"
                acked[ack.event_id] = ack.device_seq
            async with session(url, key, dev_a) as a:
                # resend the unacked event as the web client does
                ack = await a.send_event(FAULT_STREAM, "clipboard:text", b"faulty", device_seq=fault_seq,
                                         event_id=fault_id)
                assert ack.status in ("stored", "duplicate"), ack
                acked[fault_id] = fault_seq
                ack = await a.send_event(STREAM, "clipboard:text", b"after", device_seq=fault_seq + 1)
                assert ack.status == "stored"
                acked[ack.event_id] = ack.device_seq
            expected = set(acked)
            await receiver.wait_for(expected)
            nursery.cancel_scope.cancel()

        stored = await trio.to_thread.run_sync(db.events, user)
        assert expected <= set(stored.values()), "an acked event is not stored"
        live = receiver.seen
        assert sorted(e.event_id for e in live) == sorted(set(e.event_id for e in live)), f"{fault}: delivered twice"
        for e in live:  # no sequence number a client saw was given to another event
            assert stored.get((e.stream_id, e.stream_seq)) == e.event_id, f"{fault}: seq reused for {e.raw}"

        # B reconnects and replays: nothing more (it acked everything), nothing lost
        async with session(url, key, dev_b, ack_event_ids=False) as b:
            replayed = await b.replay()
        got = [e.event_id for e in live] + [e.event_id for e in replayed.events]
        assert sorted(got) == sorted(set(got)), f"{fault}: an event reached B twice"
        assert expected <= set(got), f"{fault}: B never got {expected - set(got)}"
        # every acked event is replayable for a new device of the user
        async with session(url, key, new_device_id()) as d:
            fresh = await d.replay()
        assert expected <= {e.event_id for e in fresh.events}

        # /health recovers by itself (its cache lasts a few seconds)
        with trio.fail_after(15):
            while (await http.get(f"{running.http_url}/health")).status_code != 200:
                await trio.sleep(0.3)


def fault_config(tmp_path: Path, backend: dict[str, dict[str, Any]], **storage: Any) -> Config:
    sections = {name: dict(values) for name, values in backend.items()}
    sections["storage"] = {**sections.get("storage", {}), "op_timeout": 1, **storage}
    sections["limits"] = HIGH
    return make_config(tmp_path / "data", **sections)


@pytest.mark.parametrize("fault", ["statement", "commit"])
async def test_failed_batch_acks_and_publishes_nothing(
    tmp_path: Path, backend: dict[str, dict[str, Any]], fault: str
) -> None:
    config = fault_config(tmp_path, backend)
    if config.storage.backend == "postgres":
        install, clear = PG_FUNCTIONS + PG_FAULTS[fault], PG_CLEAR
    else:
        install, clear = SQLITE_FAULTS[fault], SQLITE_CLEAR
    with trio.fail_after(90):
        await run_fault_case(config, fault, install, clear)


@pytest.mark.postgres
@pytest.mark.redis
async def test_commit_slower_than_op_timeout(tmp_path: Path, postgres_dsn: str, redis_url: str) -> None:
    """The sender gets 1013 before the COMMIT ends; the commit then succeeds: the event is delivered once
    (it is stored), and the resend is acked as a duplicate."""
    backend = {"storage": {"backend": "postgres", "dsn": postgres_dsn}, "bus": {"backend": "redis", "url": redis_url}}
    config = fault_config(tmp_path, backend, statement_timeout=5)
    with trio.fail_after(90):
        await run_fault_case(config, "commit_timeout", PG_FUNCTIONS + PG_FAULTS["commit_timeout"], PG_CLEAR)


@pytest.mark.postgres
@pytest.mark.redis
async def test_connection_lost_during_commit(tmp_path: Path, postgres_dsn: str, redis_url: str) -> None:
    """PostgreSQL's connection is cut while the batch's COMMIT runs: the daemon cannot know whether it
    committed, publishes nothing from the batch, and delivers whatever did commit by reading the store."""
    async with open_tcp_proxy("127.0.0.1", 5432) as proxy:
        proxied = make_conninfo(postgres_dsn, host="127.0.0.1", port=str(proxy.port))
        backend = {"storage": {"backend": "postgres", "dsn": proxied}, "bus": {"backend": "redis", "url": redis_url}}
        config = fault_config(tmp_path, backend, op_timeout=4, statement_timeout=5, pool_size=2)

        async def cut_during_commit() -> None:
            await trio.sleep(0.8)
            proxy.cut()
            await trio.sleep(0.3)
            proxy.restore()

        with trio.fail_after(90):
            await run_fault_case(config, "connection_lost", PG_FUNCTIONS + PG_FAULTS["connection_lost"], PG_CLEAR,
                                 during=cut_during_commit)
