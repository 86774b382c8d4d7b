"""Scale-out, end to end: two daemon PROCESSES sharing one PostgreSQL database, one Redis and one identity key.

protocol.md §4 (one connection per device, presence on all instances), §5.5 (relay exactly once, in order, on
all instances), §8 (revocation on every instance within 1 s), §9 (the device limit holds across instances) and
§2 (every instance presents the same server key). The processes are started once per module
(``pocketbridge/bench/launcher.py``); each test uses its own user key, so tests do not see each other's traffic.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from pocketbridge.bench.launcher import ServerProcess, keygen, serve_cluster
from pocketbridge.client import (
    Client,
    ClientError,
    Closed,
    DeviceKey,
    HandshakeRefused,
    ReceivedEvent,
    connect,
    new_device_id,
)
from pocketbridge.protocol.auth import sign_pb1

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

WAIT = 5.0  # bound on each single wait
QUIET = 0.5  # seconds of silence that stand for "nothing else arrives"


@attrs.frozen
class Cluster:
    server_key: str  # as printed by `pocketbridge keygen`
    one: ServerProcess
    two: ServerProcess


def _env(work: Path, n: int, dsn: str, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "PB_STORAGE_BACKEND": "postgres",
        "PB_STORAGE_DSN": dsn,
        "PB_BUS_BACKEND": "redis",
        "PB_BUS_URL": redis_url,
        "PB_SERVER_DATA_DIR": str(work / f"data{n}"),
        "PB_SERVER_IDENTITY_KEY_FILE": str(work / "identity.key"),
        **extra,
    }


@pytest.fixture(scope="module")
def scale_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A work directory with the deployment's identity key file; returns (dir, public key)."""
    work = tmp_path_factory.mktemp("scaleout")
    return work, keygen(work / "identity.key")


@pytest.fixture(scope="module")
def cluster(scale_work: tuple[Path, str], postgres_dsn: str, redis_url: str) -> Iterator[Cluster]:
    work, server_key = scale_work
    envs = [_env(work, n, postgres_dsn, redis_url) for n in (1, 2)]
    with serve_cluster(envs, work / "default", names=["default1", "default2"]) as (one, two):
        yield Cluster(server_key, one, two)


@pytest.fixture(scope="module")
def limited_cluster(scale_work: tuple[Path, str], postgres_dsn: str, redis_url: str) -> Iterator[Cluster]:
    work, server_key = scale_work
    envs = [_env(work, n, postgres_dsn, redis_url, PB_LIMITS_MAX_DEVICES_PER_USER="2") for n in (3, 4)]
    with serve_cluster(envs, work / "limited", names=["limited1", "limited2"]) as (one, two):
        yield Cluster(server_key, one, two)


# --- helpers -------------------------------------------------------------------------------------------
_last_ts = 0


def _timestamp() -> str:
    """A fresh, strictly increasing ms timestamp (identical requests must not share a signature)."""
    global _last_ts
    _last_ts = max(int(time.time() * 1000), _last_ts + 1)
    return str(_last_ts)


async def signed(
    http: httpx.AsyncClient, key: DeviceKey, device_id: str, method: str, path: str, body: bytes = b""
) -> httpx.Response:
    """A PB1 signed request (§10.2) acting as ``device_id``."""
    ts = _timestamp()
    headers = {
        "X-PB-Device-ID": device_id,
        "X-PB-Timestamp": ts,
        "X-PB-Signature": sign_pb1(key.seed, method, path, ts, device_id, body),
    }
    if body:
        headers["Content-Type"] = "application/json"
    return await http.request(method, path, content=body, headers=headers)


async def send_windowed(client: Client, count: int, *, window: int = 10, stream: str = "clipboard:main") -> list[str]:
    """Send ``count`` events keeping up to ``window`` unacked; every ack must be ``stored``. Returns the ids."""
    inflight: deque[tuple[int, str, Any]] = deque()
    ids: list[str] = []

    async def settle_oldest() -> None:
        seq, eid, pending = inflight.popleft()
        ack = await client.wait_ack(seq, pending)
        assert (ack.status, ack.device_seq, ack.event_id) == ("stored", seq, eid), ack

    for i in range(count):
        seq, eid, pending = await client.post_event(stream, "clipboard:text", b"event %d" % i)
        inflight.append((seq, eid, pending))
        ids.append(eid)
        if len(inflight) >= window:
            await settle_oldest()
    while inflight:
        await settle_oldest()
    return ids


async def receive_n(client: Client, n: int, into: list[ReceivedEvent]) -> None:
    for _ in range(n):
        into.append(await client.receive_event())


async def assert_no_event(client: Client, seconds: float = QUIET) -> None:
    with trio.move_on_after(seconds):
        event = await client.receive_event(ack=False)
        raise AssertionError(f"unexpected event: {event.raw}")


async def closed_with(client: Client, code: int, reason: str) -> None:
    """The connection ends (any events still in flight are ignored) with exactly this close."""
    with pytest.raises(Closed):
        while True:
            await client.receive_event(ack=False)
    assert (client.close_code, client.close_reason) == (code, reason)


async def refused(url: str, key: DeviceKey, device_id: str) -> tuple[int | None, str | None]:
    """Handshake that must be refused; returns (code, reason)."""
    with pytest.raises(HandshakeRefused) as exc:
        async with connect(url, key, device_id):
            pass
    return exc.value.code, exc.value.reason


def _active_devices(dsn: str, user_id: str) -> list[str]:
    """The user's non-revoked devices, read from the database directly."""
    import psycopg

    with psycopg.connect(dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT device_id FROM devices WHERE user_id = %s AND revoked_at IS NULL", (user_id,)
        ).fetchall()
    return [row[0] for row in rows]


# --- tests ---------------------------------------------------------------------------------------------
async def test_relay_across_instances_exactly_once_and_in_order(
    cluster: Cluster, postgres_dsn: str, redis_url: str
) -> None:
    """§5.5: A on instance 1 sends 100 events; B on instance 2 and C on instance 1 each get all of them,
    exactly once, in order, and nothing else."""
    key = DeviceKey.generate()
    dev_a, dev_b, dev_c = new_device_id(), new_device_id(), new_device_id()
    with trio.fail_after(40):
        async with (
            connect(cluster.two.ws_url, key, dev_b) as b,
            connect(cluster.one.ws_url, key, dev_c) as c,
            connect(cluster.one.ws_url, key, dev_a) as a,
        ):
            got_b: list[ReceivedEvent] = []
            got_c: list[ReceivedEvent] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_n, b, 100, got_b)
                nursery.start_soon(receive_n, c, 100, got_c)
                with trio.fail_after(20):
                    sent = await send_windowed(a, 100, window=10)
                with trio.fail_after(WAIT):  # the stragglers arrive promptly after the last ack
                    while len(got_b) < 100 or len(got_c) < 100:
                        await trio.sleep(0.01)
            for name, got in (("B (other instance)", got_b), ("C (same instance)", got_c)):
                assert [e.event_id for e in got] == sent, f"{name}: wrong events or order"
                assert [e.device_seq for e in got] == list(range(1, 101)), name
                assert [e.stream_seq for e in got] == list(range(1, 101)), name
                assert {(e.user_id, e.device_id, e.stream_id) for e in got} == {
                    (key.public_hex, dev_a, "clipboard:main")
                }
                assert [e.payload for e in got] == [b"event %d" % i for i in range(100)], name
            async with trio.open_nursery() as nursery:
                for client in (a, b, c):
                    nursery.start_soon(assert_no_event, client)


async def test_presence_across_instances(cluster: Cluster, postgres_dsn: str, redis_url: str) -> None:
    """§4: B on instance 2 sees A (instance 1) come online and go offline; /api/presence on either
    instance reflects connections on all instances."""
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    with trio.fail_after(30):
        async with connect(cluster.two.ws_url, key, dev_b, device_name="Phone", device_type="mobile") as b:
            before = int(time.time() * 1000)
            async with connect(cluster.one.ws_url, key, dev_a, device_name="Laptop", device_type="desktop"):
                with trio.fail_after(WAIT):
                    online = await b.next_notice("device_status_changed")
                p = online["payload"]
                assert {k: v for k, v in p.items() if k != "timestamp"} == {
                    "type": "device_status_changed",
                    "user_id": key.public_hex,
                    "device_id": dev_a,
                    "device_name": "Laptop",
                    "device_type": "desktop",
                    "is_online": True,
                }, p
                assert before - 2_000 <= p["timestamp"] <= int(time.time() * 1000) + 2_000
                # the REST presence on instance 1 knows B, connected to instance 2
                async with httpx.AsyncClient(base_url=cluster.one.http_url, timeout=WAIT) as http:
                    r = await signed(http, key, dev_a, "GET", "/api/presence")
                assert r.status_code == 200, r.text
                online_ids = {d["device_id"] for d in r.json()["devices"] if d["is_online"]}
                assert online_ids == {dev_a, dev_b}, r.json()
            with trio.fail_after(WAIT):
                offline = await b.next_notice("device_status_changed")
            p = offline["payload"]
            assert {k: v for k, v in p.items() if k != "timestamp"} == {
                "type": "device_status_changed",
                "user_id": key.public_hex,
                "device_id": dev_a,
                "is_online": False,
            }, p


async def test_revocation_across_instances_within_one_second(
    cluster: Cluster, postgres_dsn: str, redis_url: str
) -> None:
    """§8: a device connected to instance 2, revoked through instance 1's REST API, is told and closed within
    1 s; afterwards its handshakes are refused on every instance."""
    key = DeviceKey.generate()
    laptop, phone = new_device_id(), new_device_id()
    with trio.fail_after(30):
        async with connect(cluster.one.ws_url, key, laptop):
            pass  # registered, so it can sign REST requests
        async with (
            httpx.AsyncClient(base_url=cluster.one.http_url, timeout=WAIT) as http,
            connect(cluster.two.ws_url, key, phone) as p,
        ):
            r = await signed(http, key, laptop, "DELETE", f"/api/devices/{phone}")
            committed = trio.current_time()  # the revocation is committed before the response
            assert r.status_code == 200, r.text
            assert r.json() == {"success": True, "message": f"Device {phone} has been removed"}
            with trio.fail_after(1.0):
                notice = await p.next_notice("device_revoked")
                await closed_with(p, 1000, "Device revoked")
            assert trio.current_time() - committed < 1.0
            assert notice["payload"]["type"] == "device_revoked"
            assert notice["payload"]["reason"] == "Device has been removed by user"
        for server in (cluster.one, cluster.two):
            assert await refused(server.ws_url, key, phone) == (1008, "Device has been revoked"), server.name
            assert await refused(server.ws_url, key, phone.upper()) == (1008, "Device has been revoked"), server.name


async def test_device_replacement_across_instances(cluster: Cluster, postgres_dsn: str, redis_url: str) -> None:
    """§4: the same device connects to instance 1, then to instance 2; the first connection is closed with
    1000, the second keeps receiving live events, and no offline notification goes out."""
    key = DeviceKey.generate()
    sender, dev_x = new_device_id(), new_device_id()
    with trio.fail_after(30):
        async with (
            connect(cluster.one.ws_url, key, sender) as s,
            connect(cluster.one.ws_url, key, dev_x, device_name="X") as x1,
        ):
            with trio.fail_after(WAIT):
                first = await s.next_notice("device_status_changed")
            assert (first["payload"]["device_id"], first["payload"]["is_online"]) == (dev_x, True)
            ack = await s.send_event("clipboard:main", "clipboard:text", b"before")
            assert ack.status == "stored"
            with trio.fail_after(WAIT):
                assert (await x1.receive_event()).payload == b"before"

            async with connect(cluster.two.ws_url, key, dev_x, device_name="X") as x2:
                with trio.fail_after(WAIT):
                    await closed_with(x1, 1000, "New connection established for this device")
                with trio.fail_after(WAIT):
                    second = await s.next_notice("device_status_changed")
                assert (second["payload"]["device_id"], second["payload"]["is_online"]) == (dev_x, True)
                # the replaced connection's teardown touches nothing of the new one
                await trio.sleep(0.3)
                for i in range(3):
                    ack = await s.send_event("clipboard:main", "clipboard:text", b"after %d" % i)
                    assert ack.status == "stored"
                    with trio.fail_after(WAIT):
                        event = await x2.receive_event()
                    assert (event.payload, event.event_id) == (b"after %d" % i, ack.event_id)
                await assert_no_event(x2)
                with trio.move_on_after(QUIET):
                    extra = await s.next_notice("device_status_changed")
                    raise AssertionError(f"unexpected presence notice after a replacement: {extra}")
                async with httpx.AsyncClient(base_url=cluster.two.http_url, timeout=WAIT) as http:
                    r = await signed(http, key, sender, "GET", "/api/presence")
                assert r.status_code == 200, r.text
                states = {d["device_id"]: d["is_online"] for d in r.json()["devices"]}
                assert states == {sender: True, dev_x: True}, r.json()


async def test_device_limit_holds_across_instances(limited_cluster: Cluster, postgres_dsn: str, redis_url: str) -> None:
    """§3.6/§9 with max_devices_per_user = 2: four new devices of one user handshake concurrently, two on
    each instance; exactly two are admitted."""
    key = DeviceKey.generate()
    devices = [new_device_id() for _ in range(4)]
    urls = [
        limited_cluster.one.ws_url,
        limited_cluster.one.ws_url,
        limited_cluster.two.ws_url,
        limited_cluster.two.ws_url,
    ]
    outcomes: dict[str, tuple[int | None, str | None]] = {}
    go = trio.Event()

    async def attempt(url: str, device_id: str) -> None:
        await go.wait()
        try:
            async with connect(url, key, device_id):
                outcomes[device_id] = (None, "admitted")
        except HandshakeRefused as exc:
            outcomes[device_id] = (None if exc.code is None else int(exc.code), exc.reason)
        except ClientError as exc:  # e.g. another message before session_established (§3.6 step 7)
            outcomes[device_id] = (None, f"handshake broken: {exc}")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for url, device_id in zip(urls, devices, strict=True):
                nursery.start_soon(attempt, url, device_id)
            await trio.sleep(0.05)
            go.set()
        registered = await trio.to_thread.run_sync(_active_devices, postgres_dsn, key.public_hex)
        assert len(registered) == 2, f"{len(registered)} devices registered: {outcomes}"
        assert sorted(outcomes.values(), key=repr) == sorted(
            [(None, "admitted")] * 2 + [(1008, "Device limit reached")] * 2, key=repr
        ), outcomes
        admitted = [d for d, o in outcomes.items() if o == (None, "admitted")]
        # still two: a fifth device is refused everywhere; the admitted ones come back on either instance
        for server in (limited_cluster.one, limited_cluster.two):
            assert await refused(server.ws_url, key, new_device_id()) == (1008, "Device limit reached")
            for device_id in admitted:
                async with connect(server.ws_url, key, device_id):
                    pass


async def test_both_instances_present_the_same_server_key(cluster: Cluster, postgres_dsn: str, redis_url: str) -> None:
    """§2: all instances share the identity key file, so clients that pin the key can use any instance."""
    assert cluster.one.server_key == cluster.two.server_key == cluster.server_key
    key = DeviceKey.generate()
    device = new_device_id()
    with trio.fail_after(20):
        for server in (cluster.one, cluster.two):
            async with connect(server.ws_url, key, device, pin=cluster.server_key) as client:
                assert client.server_key == cluster.server_key
