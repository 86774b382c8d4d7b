"""Faults, end to end: Redis down between two instances, PostgreSQL unreachable under a live stream.

protocol.md §5.5 (the bus is a wake-up, the store is the truth: relay survives a bus outage exactly once),
§5.2/§5.4 (an event is acked only once it is stored; the store being unavailable closes 1013), §3.6 (handshakes
during a store outage get 1013), §10.3 (/health and /health/ready report the failing dependency).

The daemons run in-process (``tests/conftest.py`` ``run_daemon``) on the session's PostgreSQL database. The Redis
of the first test is a private ``redis-server`` the test kills and restarts; the PostgreSQL of the second sits
behind a TCP proxy the test cuts and restores (``tests/e2e/tcpproxy.py``).
"""

from __future__ import annotations

import socket
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pocketbridge.client import Client, Closed, DeviceKey, HandshakeRefused, ReceivedEvent, connect, new_device_id
from pocketbridge.config import Config
from pocketbridge.identity import write_new_identity
from tests.conftest import make_config, run_daemon
from tests.e2e.tcpproxy import open_tcp_proxy

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

QUIET = 0.5
HIGH = 10_000  # per-address limits out of the way: every test client connects from 127.0.0.1


# --- helpers -------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_config(data_dir: Path, identity: Path, **sections: dict[str, Any]) -> Config:
    base: dict[str, dict[str, Any]] = {
        "server": {"identity_key_file": str(identity)},
        "drain": {"window": 0.5, "deadline": 3},
        "limits": {"ws_connects_per_ip_per_minute": HIGH, "handshakes_per_ip_per_minute": HIGH},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return make_config(data_dir, **base)


class PrivateRedis:
    """A throwaway ``redis-server`` on a fixed loopback port (no persistence), killed with SIGKILL."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: trio.Process | None = None
        self.starts = 0

    async def start(self, timeout: float = 10.0) -> None:
        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "wb")  # noqa: SIM115, ASYNC230 (tiny local file)
        try:
            self.proc = await trio.lowlevel.open_process(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        with trio.fail_after(timeout):
            while not await self.answers():
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited: {(self.workdir / f'redis-{self.starts}.log').read_text()}"
                    )
                await trio.sleep(0.05)

    async def answers(self) -> bool:
        try:
            with trio.move_on_after(1):
                stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                async with stream:
                    await stream.send_all(b"PING\r\n")
                    return (await stream.receive_some(64)).startswith(b"+PONG")
        except OSError:
            return False
        return False

    async def kill(self) -> None:
        if self.proc is not None:
            with trio.CancelScope(shield=True):
                if self.proc.returncode is None:
                    self.proc.kill()
                with trio.move_on_after(10):
                    await self.proc.wait()
            self.proc = None


@asynccontextmanager
async def instances_on_private_redis(
    tmp_path: Path, postgres_dsn: str, **sections: dict[str, Any]
) -> AsyncIterator[tuple[PrivateRedis, Callable[[str], Config]]]:
    """A Redis of the test's own (started here, killed at the end, and in between whenever the test says)
    and ``config(name)``: the configuration of an instance on it and on PostgreSQL, with ``sections`` added;
    every instance shares one identity key."""
    redis = PrivateRedis(free_port(), tmp_path)
    identity = tmp_path / "identity.key"
    write_new_identity(identity)
    await redis.start()
    base = {"storage": {"backend": "postgres", "dsn": postgres_dsn}, "bus": {"backend": "redis", "url": redis.url}}
    try:
        yield redis, lambda name: daemon_config(tmp_path / name, identity, **base, **sections)
    finally:
        await redis.kill()


async def wait_status(http: httpx.AsyncClient, url: str, status: int, timeout: float) -> httpx.Response:
    """Poll ``url`` until it answers ``status`` (bounded); returns that response."""
    last: Any = None
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    last = await http.get(url)
                    if last.status_code == status:
                        return last
                except httpx.HTTPError as exc:
                    last = exc
                await trio.sleep(0.2)
    except trio.TooSlowError:
        detail = f"{last.status_code} {last.text}" if isinstance(last, httpx.Response) else repr(last)
        raise AssertionError(f"{url} did not answer {status} within {timeout} s (last: {detail})") from None


async def assert_no_event(client: Client, seconds: float = QUIET) -> None:
    with trio.move_on_after(seconds):
        event = await client.receive_event(ack=False)
        raise AssertionError(f"unexpected event: {event.raw}")


def stored_event_ids(dsn: str, user_id: str) -> dict[str, int]:
    """event_id -> number of rows, read from the database directly."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT event_id, count(*) FROM events WHERE user_id = %s GROUP BY event_id", (user_id,)
        ).fetchall()
    return {row[0]: int(row[1]) for row in rows}


# --- Redis down ----------------------------------------------------------------------------------------
async def test_redis_down_relay_continues_through_the_store_and_recovers(
    tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    """Kill the bus between two instances: B (instance 2) still gets A's (instance 1) events exactly once,
    through the store catch-up; readiness is 503 meanwhile. Restart Redis on the same port: the instances
    resubscribe, readiness is 200 again, and relay is fast again. Nothing is lost or delivered twice."""
    async with instances_on_private_redis(tmp_path, postgres_dsn) as (redis, config):
        cfg1, cfg2 = config("d1"), config("d2")
        key = DeviceKey.generate()
        dev_a, dev_b = new_device_id(), new_device_id()
        sent: list[str] = []
        got: list[ReceivedEvent] = []

        async def send(a: Client, label: bytes) -> str:
            ack = await a.send_event("clipboard:main", "clipboard:text", label)
            assert ack.status == "stored", ack
            assert ack.event_id is not None
            sent.append(ack.event_id)
            return ack.event_id

        with trio.fail_after(75):
            async with (
                run_daemon(cfg1) as (_, one),
                run_daemon(cfg2) as (_, two),
                httpx.AsyncClient(timeout=5) as http,
                connect(one.ws_url, key, dev_a) as a,
                connect(two.ws_url, key, dev_b) as b,
            ):
                ready1, ready2 = f"{one.http_url}/health/ready", f"{two.http_url}/health/ready"
                assert (await http.get(ready2)).status_code == 200
                # healthy: through Redis, quickly
                await send(a, b"healthy")
                with trio.fail_after(1):
                    got.append(await b.receive_event())

                await redis.kill()
                killed_at = trio.current_time()
                for i in range(20):
                    await send(a, b"outage %d" % i)
                with trio.fail_after(10):  # the degraded catch-up polls the store twice a second
                    for _ in range(20):
                        got.append(await b.receive_event())
                print(f"20 events relayed through the store {trio.current_time() - killed_at:.1f} s after the kill")
                assert [e.event_id for e in got] == sent
                await assert_no_event(b)

                down = await wait_status(http, ready2, 503, timeout=10)
                assert down.headers.get("Retry-After") == "5"
                assert down.json()["status"] == "not_ready"
                assert down.json()["services"]["bus"] == "disconnected", down.json()

                print(f"readiness 503 {trio.current_time() - killed_at:.1f} s after the kill")
                await redis.start()
                restarted_at = trio.current_time()
                await wait_status(http, ready2, 200, timeout=12)
                print(f"readiness 200 {trio.current_time() - restarted_at:.1f} s after the restart")
                # (instance 1's readiness is checked only afterwards: its probe must not warm up the
                # connection its publisher uses)
                for i in range(5):
                    event_id = await send(a, b"recovered %d" % i)
                    with trio.fail_after(1):
                        got.append(await b.receive_event())
                    assert got[-1].event_id == event_id
                await wait_status(http, ready1, 200, timeout=5)

                assert len(sent) == 26
                assert [e.event_id for e in got] == sent
                await assert_no_event(b)
                # a new device replays them all, once each
                async with connect(two.ws_url, key, new_device_id()) as c:
                    assert [e.event_id for e in (await c.replay(limit=1000)).events] == sent

            # and the store holds each of them once
            counts = await trio.to_thread.run_sync(stored_event_ids, postgres_dsn, key.public_hex)
            assert counts == {event_id: 1 for event_id in sent}


# --- PostgreSQL unreachable ----------------------------------------------------------------------------
async def test_postgres_unreachable_mid_stream(tmp_path: Path, postgres_dsn: str, redis_url: str) -> None:
    """Cut the daemon's PostgreSQL connections while A streams events: every ack A got is for a stored
    event and the rest end in a 1013 close; handshakes get 1013 and /health is degraded during the outage.
    Restore it: without a restart, handshakes succeed, A's resent events are acked (stored or duplicate), and
    a new device B replays every event exactly once."""
    identity = tmp_path / "identity.key"
    write_new_identity(identity)
    dbname = conninfo_to_dict(postgres_dsn)["dbname"]
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()

    async with open_tcp_proxy("127.0.0.1", 5432) as proxy:
        proxied = make_conninfo(postgres_dsn, host="127.0.0.1", port=str(proxy.port), dbname=dbname)
        cfg = daemon_config(
            tmp_path / "d",
            identity,
            storage={"backend": "postgres", "dsn": proxied, "op_timeout": 2, "statement_timeout": 1, "pool_size": 4},
            bus={"backend": "redis", "url": redis_url},
        )
        with trio.fail_after(75):
            async with run_daemon(cfg) as (_, running), httpx.AsyncClient(timeout=10) as http:
                health = f"{running.http_url}/health"
                assert (await http.get(health)).status_code == 200

                # --- A streams; the proxy is cut mid-stream ---
                posted: list[tuple[int, str, bytes, Any]] = []  # (device_seq, event_id, payload, pending)
                acks: dict[str, Any] = {}
                async with connect(running.ws_url, key, dev_a) as a:
                    inflight: deque[tuple[int, str, bytes, Any]] = deque()
                    cut = False
                    cut_at = 0.0

                    async def settle_oldest() -> None:
                        seq, eid, _, pending = inflight.popleft()
                        ack = await a.wait_ack(seq, pending)
                        assert (ack.status, ack.device_seq, ack.event_id) == ("stored", seq, eid), ack
                        acks[eid] = ack

                    with pytest.raises(Closed):
                        for i in range(100_000):
                            payload = b"stream %d" % i
                            seq, eid, pending = await a.post_event("clipboard:main", "clipboard:text", payload)
                            posted.append((seq, eid, payload, pending))
                            inflight.append((seq, eid, payload, pending))
                            if len(inflight) >= 5:
                                await settle_oldest()
                            if not cut and len(acks) >= 20:
                                proxy.cut()  # events are in flight right now
                                cut = True
                                cut_at = trio.current_time()
                        raise AssertionError("the stream never ended after the cut")
                    assert cut
                    print(
                        f"A closed {a.close_code} {a.close_reason!r} {trio.current_time() - cut_at:.1f} s after the cut"
                    )
                    assert (a.close_code, a.close_reason) == (1013, "Try again later")
                    # no ack other than "stored" arrived (checked as they were taken); collect late ones
                    for seq, eid, _, pending in inflight:
                        if pending.done.is_set():
                            assert (pending.ack.status, pending.ack.event_id) == ("stored", eid), pending.ack
                            acks[eid] = pending.ack
                unacked = [(seq, eid, payload) for seq, eid, payload, _ in posted if eid not in acks]
                assert unacked, "the cut left nothing in flight"
                print(f"cut after {len(acks)} acks; {len(unacked)} of {len(posted)} events unacked")

                # --- during the outage ---
                for device in (new_device_id(), dev_a):
                    with pytest.raises(HandshakeRefused) as refused:
                        async with connect(running.ws_url, key, device):
                            pass
                    assert (refused.value.code, refused.value.reason) == (1013, "Try again later")
                degraded = await wait_status(http, health, 503, timeout=10)
                print(f"/health degraded {trio.current_time() - cut_at:.1f} s after the cut")
                assert degraded.headers.get("Retry-After") == "30"
                body = degraded.json()
                assert body["status"] == "degraded", body
                assert body["services"]["database"] == "disconnected", body
                assert isinstance(body.get("hint"), str) and body["hint"], body

                # --- restored: the same daemon recovers ---
                print(f"restoring {trio.current_time() - cut_at:.1f} s after the cut")
                proxy.restore()
                a2 = None
                with trio.fail_after(20):
                    while True:
                        try:
                            async with connect(running.ws_url, key, dev_a) as a2:
                                assert a2.last_ack_device_seq >= max(ack.device_seq for ack in acks.values())
                                pendings = []
                                resent = []
                                for seq, eid, payload in unacked:
                                    _, _, pending = await a2.post_event(
                                        "clipboard:main", "clipboard:text", payload, event_id=eid, device_seq=seq
                                    )
                                    pendings.append((seq, eid, pending))
                                for seq, eid, pending in pendings:
                                    ack = await a2.wait_ack(seq, pending)
                                    assert ack.status in ("stored", "duplicate"), ack
                                    assert (ack.device_seq, ack.event_id) == (seq, eid), ack
                                    resent.append(ack)

                                print(
                                    f"recovered {trio.current_time() - cut_at:.1f} s after the cut; resent:",
                                    [ack.status for ack in resent],
                                )
                                async with connect(running.ws_url, key, dev_b) as b:
                                    replayed = (await b.replay(limit=1000)).events
                                    ids = [e.event_id for e in replayed]
                                    assert len(ids) == len(set(ids)), "an event was replayed twice"
                                    assert set(acks) <= set(ids), "an acked event is missing"
                                    assert ids == [eid for _, eid, _, _ in posted]
                                    assert [e.device_seq for e in replayed] == [seq for seq, _, _, _ in posted]
                                    # and live relay works again
                                    next_seq = max(seq for seq, _, _, _ in posted) + 1
                                    ack = await a2.send_event(
                                        "clipboard:main", "clipboard:text", b"after", device_seq=next_seq
                                    )
                                    assert ack.status == "stored"
                                    with trio.fail_after(2):
                                        assert (await b.receive_event()).event_id == ack.event_id
                            break
                        except HandshakeRefused as exc:
                            assert (exc.code, exc.reason) == (1013, "Try again later")
                            await trio.sleep(0.2)
                await wait_status(http, health, 200, timeout=10)

    counts = await trio.to_thread.run_sync(stored_event_ids, postgres_dsn, key.public_hex)
    expected = [eid for _, eid, _, _ in posted]
    assert len(counts) == len(expected) + 1  # plus the one sent after recovery
    assert all(counts.get(eid) == 1 for eid in expected), {
        eid: counts.get(eid) for eid in expected if counts.get(eid) != 1
    }
    assert all(n == 1 for n in counts.values())
