"""`pocketbridge bench --scenario soak`: a long run of mixed load against one daemon, watching it for leaks.

The benchmark starts its own daemon (``scenario_env`` of runner.py, as every scenario does) and, for ``--duration``
seconds, runs four kinds of activity side by side from this process:

* churn: devices connect, handshake, ping and disconnect; every tenth cycle instead aborts in the middle of the
  handshake (TCP reset after ``server_hello``), every tenth resets the TCP connection of an established session,
  and every tenth opens a second connection for the same device (the server closes the first, §4);
* events: users with a sender and a receiver device; the sender sends at a fixed rate, the receiver receives and
  acks every event live; both reconnect every few seconds; events not received are losses;
* replays: a sender stores a batch while the replaying device is offline; that device reconnects and replays
  (``replay_request`` pages, acked); an event of the batch missing from the replay is a loss;
* pairings: a new initiator device of an account asks for a code, a new device completes the pairing, sends an
  event the initiator receives live, and is then revoked over the HTTP API (``DELETE /api/devices/{id}``, PB1),
  as is the initiator, so the account never reaches its device limit (if revocation did not work it would, and
  pairing would fail).

Every few seconds it samples the daemon: RSS (VmRSS), open file descriptors (/proc/<pid>/fd), trio tasks (the
``pocketbridge_trio_tasks`` gauge of /metrics), open connections, and the database size (SQLite file + WAL, or
pg_database_size). Before the load, after a warm-up round of every activity, it measures the idle baseline; after
the load it waits (bounded by ``--settle``) for fds and tasks to come back to it. A leak is an fd or task count
above the baseline + tolerance once settled; that, an activity that never happened, errors or losses exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import psycopg
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from .. import __version__
from ..client import Client, Closed, DeviceKey, ReceivedEvent, connect, new_device_id
from .choice import backend_choice
from .daemon import BackendChoice, DaemonProcess, describe_config
from .env import Env, scenario_env
from .http import http_request, pb1
from .params import BenchError, Params
from .soak_report import render
from .stats import slope_per_minute
from .sysinfo import busy_cores, cpu_seconds, machine_info, machine_jiffies, raise_nofile, rss_kb
from .wire import RawHandshake
from .worker import describe

STREAM = "clipboard:soak"
TYPE = "clipboard:text"
COUNTER = struct.Struct(">Q")
OP_TIMEOUT = 30.0  # any single step (a connect, a send, a replay, an HTTP request)
DRAIN = 10.0  # max wait for a session's events to reach its receiver
LANE_GRACE = 60.0  # after the load: max wait for the activities to finish their current step
MAX_ERROR_TEXTS = 30
CHURN_KINDS = ("full", "full", "full", "aborted", "full", "replaced", "full", "reset", "full", "full")
ACTIVITIES = ("connects", "events_received", "replays", "pairings")  # must each be > 0


@attrs.define
class SoakParams:
    duration: float = 600.0
    interval: float = 5.0
    settle: float = 60.0
    event_users: int = 4
    event_rate: float = 20.0  # events per second over all event users
    session_s: float = 20.0  # event users reconnect after this long
    payload_bytes: int = 256
    churn_lanes: int = 2
    churn_rate: float = 5.0  # cycles per second per churn lane
    replay_users: int = 2
    replay_batch: int = 20
    replay_pause: float = 1.0
    pairing_accounts: int = 4
    pairing_interval: float = 2.0
    fd_tolerance: int = 2
    task_tolerance: int = 2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SoakParams:
        p = cls()
        if getattr(args, "quick", False):
            p.duration = 30.0
        if args.duration is not None:
            p.duration = args.duration
        p.interval = getattr(args, "sample_interval", None) or min(5.0, max(0.5, p.duration / 60))
        p.settle = getattr(args, "settle", None) or p.settle
        p.session_s = min(20.0, max(2.0, p.duration / 5))
        if args.users is not None:
            p.event_users = args.users
        if args.rate:
            p.event_rate = args.rate[0]
        if args.payload_bytes is not None:
            p.payload_bytes = args.payload_bytes
        if p.payload_bytes < COUNTER.size:
            raise BenchError(f"--payload-bytes must be at least {COUNTER.size} for the soak (the event counter)")
        # two revocations per pairing, per account: stay below [http] device_mutations_per_user_per_minute (30)
        p.pairing_accounts = max(p.pairing_accounts, math.ceil(2 * 60 / p.pairing_interval / 20))
        return p


class Stats:
    """Counts of what the load did, and its errors (a few texts kept)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.errors: list[str] = []
        self.errors_by_activity: dict[str, int] = defaultdict(int)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def error(self, activity: str, exc: BaseException | str) -> None:
        self.errors_by_activity[activity] += 1
        if len(self.errors) < MAX_ERROR_TEXTS:
            text = exc if isinstance(exc, str) else describe(exc)
            self.errors.append(f"{activity}: {text}")

    @property
    def error_count(self) -> int:
        return sum(self.errors_by_activity.values())


def payload(counter: int, size: int) -> bytes:
    return COUNTER.pack(counter) + b"\x5a" * (size - COUNTER.size)


def counter_of(event: ReceivedEvent) -> int:
    return int(COUNTER.unpack_from(event.payload)[0])


async def pause(stop: trio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile."""
    if seconds > 0:
        with trio.move_on_after(seconds):
            await stop.wait()


async def wait_closed(client: Client) -> tuple[int | None, str | None]:
    """Read the client's notices until the server closes it; the close code and reason."""
    with contextlib.suppress(Closed):
        while True:
            await client.next_notice()
    return client.close_code, client.close_reason


# --- raw WebSocket connections (to drop them without a close handshake) -----------------------------------


@asynccontextmanager
async def raw_websocket(url: str) -> AsyncIterator[tuple[WebSocketConnection, trio.SocketStream]]:
    """A WebSocket over a TCP stream of our own; on the way out the TCP connection is reset (SO_LINGER 0), with
    no WebSocket close frame: the server sees the peer vanish."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stream = await trio.open_tcp_stream(host, port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, host, parts.path or "/")
            try:
                yield ws, stream
            finally:
                with contextlib.suppress(OSError, trio.ClosedResourceError):  # unless already gone
                    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                nursery.cancel_scope.cancel()  # the reader task ends without sending a close frame
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


# --- the load ------------------------------------------------------------------------------------------


class Load:
    """The four activities against one daemon; every step bounded, every error counted."""

    def __init__(self, ws_url: str, http: tuple[str, int], p: SoakParams) -> None:
        self.url = ws_url
        self.http = http
        self.p = p
        self.stats = Stats()
        self.accounts = [DeviceKey.generate() for _ in range(p.pairing_accounts)]
        self._pairing_round = 0

    async def _guard(self, activity: str, step: Any, stop: trio.Event) -> None:
        try:
            with trio.fail_after(OP_TIMEOUT * 3):
                await step()
        except Exception as exc:  # noqa: BLE001  (counted; the soak goes on)
            self.stats.error(activity, exc)
            await pause(stop, 0.5)

    # -- churn ------------------------------------------------------------------------------------------
    async def churn_lane(self, lane: int, stop: trio.Event) -> None:
        key = DeviceKey.generate()
        devices = [new_device_id() for _ in range(3)]
        n = lane  # lanes start at different kinds
        next_t = trio.current_time()
        while not stop.is_set():
            kind, device = CHURN_KINDS[n % len(CHURN_KINDS)], devices[n % len(devices)]
            n += 1
            await self._guard("churn", lambda kind=kind, device=device: self.churn_once(kind, key, device), stop)
            next_t = max(next_t + 1 / self.p.churn_rate, trio.current_time() - 1.0)
            await pause(stop, next_t - trio.current_time())

    async def churn_once(self, kind: str, key: DeviceKey, device: str) -> None:
        s = self.stats
        if kind == "full":
            async with connect(self.url, key, device, device_type="web", handshake_timeout=OP_TIMEOUT) as c:
                s.add("connects")
                await c.ping()
        elif kind == "replaced":
            async with connect(self.url, key, device, device_type="web", handshake_timeout=OP_TIMEOUT) as first:
                s.add("connects")
                async with connect(self.url, key, device, device_type="web", handshake_timeout=OP_TIMEOUT) as second:
                    s.add("connects")
                    with trio.fail_after(OP_TIMEOUT):
                        code, reason = await wait_closed(first)
                    if code != 1000:
                        raise BenchError(f"the replaced connection was closed with {code} {reason!r}, not 1000")
                    await second.ping()
        elif kind == "aborted":
            async with raw_websocket(self.url) as (ws, _):
                hs = RawHandshake(ws, key, device, timeout=OP_TIMEOUT)
                await hs.hello()
                try:
                    await hs.read_server_hello()
                except AssertionError as exc:
                    raise BenchError(f"expected a valid server_hello: {exc}") from None
        elif kind == "reset":
            async with raw_websocket(self.url) as (ws, _):
                client = Client(ws, key, device, ack_event_ids=True, reply_timeout=OP_TIMEOUT)
                await client._handshake(pin=None, device_name=None, device_type="web")  # the SDK's own handshake
                s.add("connects")
        else:
            raise AssertionError(kind)
        s.add(f"churn_{kind}")

    # -- events -----------------------------------------------------------------------------------------
    async def event_lane(self, user: int, stop: trio.Event) -> None:
        key = DeviceKey.generate()
        sender, receiver = new_device_id(), new_device_id()
        counter = [0]
        while not stop.is_set():
            await self._guard("events", lambda: self.event_session(key, sender, receiver, counter, stop), stop)

    async def event_session(
        self, key: DeviceKey, sender_id: str, receiver_id: str, counter: list[int], stop: trio.Event
    ) -> None:
        s, p = self.stats, self.p
        interval = self.p.event_users / self.p.event_rate
        stored: set[int] = set()
        received: set[int] = set()
        async with AsyncExitStack() as stack:
            receiver = await stack.enter_async_context(
                connect(self.url, key, receiver_id, device_type="web", handshake_timeout=OP_TIMEOUT)
            )
            sender = await stack.enter_async_context(
                connect(self.url, key, sender_id, device_type="web", handshake_timeout=OP_TIMEOUT)
            )
            s.add("connects", 2)

            sending = [True]
            drained = trio.Event()  # sending is over and the receiver has every stored event

            def check_drained() -> None:
                if not sending[0] and stored <= received:
                    drained.set()

            async def receive() -> None:
                while True:
                    c = counter_of(await receiver.receive_event(ack=True))
                    if c in received:
                        s.add("event_duplicates")
                    else:
                        received.add(c)
                        s.add("events_received")
                        check_drained()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                end = trio.current_time() + p.session_s
                next_t = trio.current_time()
                while trio.current_time() < end and not stop.is_set():
                    counter[0] += 1
                    ack = await sender.send_event(STREAM, TYPE, payload(counter[0], p.payload_bytes))
                    if ack.status != "stored":
                        raise BenchError(f"event acked {ack.status!r} ({ack.code} {ack.error})")
                    stored.add(counter[0])
                    s.add("events_sent")
                    next_t = max(next_t + interval, trio.current_time() - 1.0)
                    await pause(stop, min(next_t, end) - trio.current_time())
                sending[0] = False
                check_drained()
                with trio.move_on_after(DRAIN):
                    await drained.wait()
                nursery.cancel_scope.cancel()
        s.add("event_losses", len(stored - received))
        s.add("event_sessions")

    # -- replays ----------------------------------------------------------------------------------------
    async def replay_lane(self, user: int, stop: trio.Event) -> None:
        key = DeviceKey.generate()
        sender, replayer = new_device_id(), new_device_id()
        seen: set[int] = set()
        counter = [0]
        rounds = [0]

        async def register() -> None:  # the replaying device exists (cursor 0) before anything is sent
            async with connect(self.url, key, replayer, device_type="web", handshake_timeout=OP_TIMEOUT) as r:
                self.stats.add("connects")
                await r.replay()

        await self._guard("replays", register, stop)
        while not stop.is_set():
            await self._guard("replays", lambda: self.replay_round(key, sender, replayer, seen, counter, rounds), stop)
            await pause(stop, self.p.replay_pause)

    async def replay_round(
        self, key: DeviceKey, sender_id: str, replayer_id: str, seen: set[int], counter: list[int], rounds: list[int]
    ) -> None:
        s, p = self.stats, self.p
        batch: set[int] = set()
        async with connect(self.url, key, sender_id, device_type="web", handshake_timeout=OP_TIMEOUT) as sender:
            s.add("connects")
            for _ in range(p.replay_batch):
                counter[0] += 1
                ack = await sender.send_event(STREAM, TYPE, payload(counter[0], p.payload_bytes))
                if ack.status != "stored":
                    raise BenchError(f"event acked {ack.status!r} ({ack.code} {ack.error})")
                batch.add(counter[0])
                s.add("replay_events_stored")
        page = (7, 100)[rounds[0] % 2]  # several pages (continuation tokens), or one
        rounds[0] += 1
        async with connect(self.url, key, replayer_id, device_type="web", handshake_timeout=OP_TIMEOUT) as replayer:
            s.add("connects")
            result = await replayer.replay(limit=page, ack=True)
        if result.full_resync is not None:
            raise BenchError(f"full_resync_required: {result.full_resync}")
        got = [counter_of(e) for e in result.events]
        s.add("replays")
        s.add("replay_pages", result.pages)
        s.add("replayed_events", len(batch & set(got)))
        s.add("replay_losses", len(batch - set(got)))
        s.add("replay_duplicates", len(got) - len(set(got)))
        s.add("replay_redelivered", len((set(got) - batch) & seen))  # an earlier batch again (cursor not advanced)
        seen.update(got)

    # -- pairings ---------------------------------------------------------------------------------------
    async def pairing_lane(self, stop: trio.Event) -> None:
        next_t = trio.current_time()
        while not stop.is_set():
            await self._guard("pairings", self.pairing_round, stop)
            next_t = max(next_t + self.p.pairing_interval, trio.current_time() - 1.0)
            await pause(stop, next_t - trio.current_time())

    async def pairing_round(self) -> None:
        s = self.stats
        account = self.accounts[self._pairing_round % len(self.accounts)]
        self._pairing_round += 1
        initiator_id, joiner_id, joiner_key = new_device_id(), new_device_id(), DeviceKey.generate()
        in_account: list[str] = []  # devices of the account this round added and has not revoked yet
        try:
            async with AsyncExitStack() as stack:
                initiator = await stack.enter_async_context(
                    connect(self.url, account, initiator_id, device_name=f"soak-{initiator_id[:8]}",
                            handshake_timeout=OP_TIMEOUT)
                )
                in_account.append(initiator_id)
                s.add("connects")
                with trio.fail_after(OP_TIMEOUT):
                    offer = await initiator.initiate_pairing()
                if offer["type"] != "pairing_initiated":
                    raise BenchError(f"initiate_pairing: {offer.get('payload')}")
                joiner = await stack.enter_async_context(
                    connect(self.url, joiner_key, joiner_id, device_name=f"soak-{joiner_id[:8]}",
                            handshake_timeout=OP_TIMEOUT)
                )
                s.add("connects")
                with trio.fail_after(OP_TIMEOUT):
                    done = await joiner.complete_pairing(offer["payload"]["code"])
                if done["type"] != "pairing_completed" or done["payload"]["linkedUserId"] != account.public_hex:
                    raise BenchError(f"complete_pairing: {done.get('payload')}")
                in_account.insert(0, joiner_id)
                s.add("pairings")
                # the paired device now relays within the account
                ack = await joiner.send_event(STREAM, TYPE, payload(0, self.p.payload_bytes))
                with trio.fail_after(OP_TIMEOUT):
                    event = await initiator.receive_event(ack=True)
                if ack.status != "stored" or event.device_id != joiner_id:
                    raise BenchError(f"paired device's event: ack {ack.status!r}, received from {event.device_id}")
                s.add("pairing_events")
                # revoke both, so the account stays below its device limit
                for client, victim in ((joiner, joiner_id), (initiator, initiator_id)):
                    await self._revoke(account, initiator_id, victim)
                    in_account.remove(victim)
                    with trio.fail_after(OP_TIMEOUT):
                        code, reason = await wait_closed(client)
                    if code != 1000:
                        raise BenchError(f"revoked device closed with {code} {reason!r}, not 1000")
                    s.add("revocations")
        except Exception:
            # a failed round must not leave devices behind: the account would reach its device limit
            for victim in in_account:
                with contextlib.suppress(Exception):  # best effort; the round's own error is reported
                    await self._revoke(account, initiator_id, victim)
            raise

    async def _revoke(self, account: DeviceKey, signer: str, victim: str) -> None:
        """DELETE /api/devices/{victim}, signed by ``signer`` (a device of ``account``, bound to its key)."""
        target = f"/api/devices/{victim}"
        status, body = await http_request(*self.http, "DELETE", target, pb1(account, signer, "DELETE", target))
        self.stats.add("http_requests")
        if status != 200:
            raise BenchError(f"DELETE {target}: {status} {body[:200]!r}")

    # -- one round of everything (before the baseline) --------------------------------------------------
    async def warm_up(self) -> None:
        stop = trio.Event()
        key = DeviceKey.generate()
        devices = [new_device_id() for _ in range(3)]
        for i, kind in enumerate(("full", "aborted", "reset", "replaced")):
            await self.churn_once(kind, key, devices[i % 3])
        saved = self.p.session_s
        self.p.session_s = 0.5
        try:
            await self.event_session(DeviceKey.generate(), new_device_id(), new_device_id(), [0], stop)
        finally:
            self.p.session_s = saved
        replayer = new_device_id()
        rkey = DeviceKey.generate()
        async with connect(self.url, rkey, replayer, handshake_timeout=OP_TIMEOUT) as r:
            await r.replay()
        await self.replay_round(rkey, new_device_id(), replayer, set(), [0], [0])
        await self.pairing_round()


# --- sampling ------------------------------------------------------------------------------------------


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


class Probe:
    """Readings of the daemon: /proc, /metrics, the database files or pg_database_size."""

    def __init__(self, env: Env) -> None:
        daemon = env.daemons[0]
        self.env = env
        self.pid = daemon.pid
        assert self.pid is not None
        self.storage = daemon.config.storage.backend
        metrics = daemon.config.metrics_address() or ("127.0.0.1", daemon.http_port)
        host = metrics[0] if metrics[0] not in ("", "0.0.0.0", "::") else "127.0.0.1"
        self.metrics = (host, metrics[1])
        self.sqlite_path = daemon.config.sqlite_path()
        self.t0 = time.monotonic()
        self.cpu_prev: tuple[float, float | None] | None = None

    async def scrape(self) -> dict[str, float]:
        status, body = await http_request(*self.metrics, "GET", "/metrics")
        if status != 200:
            raise BenchError(f"GET /metrics answered {status}")
        return parse_metrics(body.decode())

    async def database(self) -> dict[str, int | None]:
        if self.storage == "sqlite":
            sizes = {}
            for key, suffix in (("db_main_bytes", ""), ("db_wal_bytes", "-wal")):
                try:
                    sizes[key] = os.stat(f"{self.sqlite_path}{suffix}").st_size
                except OSError:
                    sizes[key] = 0
            return {"db_bytes": sizes["db_main_bytes"] + sizes["db_wal_bytes"], **sizes}
        shared = self.env.shared
        if shared is None or shared.dbname is None:
            return {"db_bytes": None}

        def size() -> int | None:
            with psycopg.connect(shared.choice.admin_dsn, autocommit=True, connect_timeout=5) as admin:
                row = admin.execute("SELECT pg_database_size(%s)", (shared.dbname,)).fetchone()
            return int(row[0]) if row else None

        return {"db_bytes": await trio.to_thread.run_sync(size)}

    async def sample(self, stats: Stats | None = None) -> dict[str, Any]:
        self.env.check_alive()
        assert self.pid is not None
        now = time.monotonic()
        fds = fd_count(self.pid)  # before the scrape, whose connection is not counted
        rss = rss_kb(self.pid)
        cpu = cpu_seconds(self.pid)
        try:
            m = await self.scrape()
        except (OSError, BenchError, trio.TooSlowError) as exc:
            m = {}
            if stats is not None:
                stats.error("metrics", exc)
        tasks = m.get("pocketbridge_trio_tasks")
        pool = m.get('pocketbridge_store{gauge="pool_size"}')
        # PostgreSQL: the pool opens connections under load and keeps them idle for a while; those are not leaks
        adjusted = fds - int(pool) if self.storage == "postgres" and fds is not None and pool is not None else fds
        cpu_pct = None
        if self.cpu_prev is not None and cpu is not None and self.cpu_prev[1] is not None and now > self.cpu_prev[0]:
            cpu_pct = round(100 * (cpu - self.cpu_prev[1]) / (now - self.cpu_prev[0]), 1)
        self.cpu_prev = (now, cpu)
        out: dict[str, Any] = {
            "t": round(now - self.t0, 2),
            "rss_kb": rss,
            "fds": fds,
            "fds_adjusted": adjusted,
            "tasks": int(tasks) if tasks is not None and not math.isnan(tasks) else None,
            "connections_open": _int(m.get("pocketbridge_connections_open")),
            "sessions_open": _int(m.get("pocketbridge_sessions_open")),
            "store_pool_size": int(pool) if pool is not None else None,
            "daemon_cpu_pct": cpu_pct,
            **(await self.database()),
        }
        if stats is not None:
            c = stats.counts
            out.update(connects=c["connects"], events=c["events_received"], replays=c["replays"],
                       pairings=c["pairings"], errors=stats.error_count)
        return out


def _int(value: float | None) -> int | None:
    return None if value is None or math.isnan(value) else int(value)


def series_summary(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
    points = [(s["t"], float(s[key])) for s in samples if s.get(key) is not None]
    if not points:
        return {"start": None, "end": None, "min": None, "max": None, "slope_per_min": None}
    half = [pt for pt in points if pt[0] >= points[0][0] + (points[-1][0] - points[0][0]) / 2]
    slope, slope2 = slope_per_minute(points), slope_per_minute(half)
    return {
        "start": points[0][1],
        "end": points[-1][1],
        "min": min(v for _, v in points),
        "max": max(v for _, v in points),
        "slope_per_min": round(slope, 3) if slope is not None else None,
        "slope_per_min_second_half": round(slope2, 3) if slope2 is not None else None,
    }


def _median(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(values) if values else None


async def settle(probe: Probe, limit: float, done: Any, stats: Stats | None = None) -> tuple[dict[str, Any], float]:
    """Sample every 0.5 s until ``done(sample)`` or ``limit`` seconds; the last sample and the time it took."""
    t0 = trio.current_time()
    while True:
        sample = await probe.sample(stats)
        elapsed = trio.current_time() - t0
        if done(sample) or elapsed >= limit:
            return sample, round(elapsed, 2)
        await trio.sleep(0.5)


def _quiet(s: dict[str, Any]) -> bool:
    return s.get("connections_open") == 0 and s.get("sessions_open") in (0, None)


# --- the run -------------------------------------------------------------------------------------------


async def run_soak(args: argparse.Namespace, p: SoakParams, choice: BackendChoice) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pb-bench-logs-") as logs:
        async with scenario_env(args, Params(), choice, 0, Path(logs), "soak") as env:
            daemon = env.daemons[0]
            result["daemon_pid"] = daemon.pid
            if env.database:
                result["database"] = env.database
            probe = Probe(env)
            load = Load(daemon.url, ("127.0.0.1", daemon.http_port), p)
            print("[bench] soak: warm-up (one round of each activity) ...", file=sys.stderr, flush=True)
            with trio.fail_after(4 * OP_TIMEOUT):
                await load.warm_up()
            result["warmup"] = dict(load.stats.counts)
            # the idle baseline: no connection left, then the median of three readings
            idle, _ = await settle(probe, 30.0, _quiet)
            if not _quiet(idle):
                raise BenchError(f"the daemon still has {idle['connections_open']} connections 30 s after the warm-up")
            base_samples = []
            for _ in range(3):
                await trio.sleep(0.5)
                base_samples.append(await probe.sample())
            baseline = {k: _median(base_samples, k) for k in ("fds", "fds_adjusted", "tasks", "rss_kb", "db_bytes")}
            result["baseline"] = {**baseline, "connections_open": base_samples[-1]["connections_open"]}
            print(
                f"[bench] soak: idle baseline {baseline['fds']} fds, {baseline['tasks']} trio tasks, "
                f"RSS {baseline['rss_kb']} kB; load for {p.duration:g} s ...",
                file=sys.stderr,
                flush=True,
            )

            load.stats = Stats()
            stop = trio.Event()
            samples: list[dict[str, Any]] = []
            probe.t0 = time.monotonic()
            report_every = max(1, round(60 / p.interval))
            async with trio.open_nursery() as nursery:
                for i in range(p.churn_lanes):
                    nursery.start_soon(load.churn_lane, i, stop)
                for u in range(p.event_users):
                    nursery.start_soon(load.event_lane, u, stop)
                for u in range(p.replay_users):
                    nursery.start_soon(load.replay_lane, u, stop)
                nursery.start_soon(load.pairing_lane, stop)
                start = trio.current_time()
                k = 0
                while True:
                    samples.append(await probe.sample(load.stats))
                    k += 1
                    if k % report_every == 0:
                        s = samples[-1]
                        print(
                            f"[bench] soak: {s['t']:.0f} s, RSS {s['rss_kb']} kB, {s['fds']} fds, {s['tasks']} tasks, "
                            f"{s['connects']} connects, {s['events']} events, {s['replays']} replays, "
                            f"{s['pairings']} pairings, {s['errors']} errors",
                            file=sys.stderr,
                            flush=True,
                        )
                    if trio.current_time() - start >= p.duration:
                        break
                    await trio.sleep_until(min(start + k * p.interval, start + p.duration))
                stop.set()
                stopping = trio.current_time()
                nursery.cancel_scope.deadline = stopping + LANE_GRACE
            if nursery.cancel_scope.cancelled_caught:
                load.stats.error("stop", f"activities still busy {LANE_GRACE:g} s after the end; cancelled")
            result["load_s"] = round(trio.current_time() - start, 2)
            result["stop_s"] = round(trio.current_time() - stopping, 2)

            # back to idle?
            fd_limit = None if baseline["fds_adjusted"] is None else baseline["fds_adjusted"] + p.fd_tolerance
            task_limit = None if baseline["tasks"] is None else baseline["tasks"] + p.task_tolerance

            def settled(s: dict[str, Any]) -> bool:
                return (
                    _quiet(s)
                    and fd_limit is not None
                    and s["fds_adjusted"] is not None
                    and s["fds_adjusted"] <= fd_limit
                    and task_limit is not None
                    and s["tasks"] is not None
                    and s["tasks"] <= task_limit
                )

            print(f"[bench] soak: load done; settling (at most {p.settle:g} s) ...", file=sys.stderr, flush=True)
            final, settle_s = await settle(probe, p.settle, settled)
            result["final"] = final
            result["settle_s"] = settle_s
            result["settled"] = settled(final)
            result["samples"] = samples
            result["counts"] = dict(sorted(load.stats.counts.items()))
            result["errors"] = {"count": load.stats.error_count, "by_activity": dict(load.stats.errors_by_activity),
                                "first": load.stats.errors}
            result["series"] = {k: series_summary(samples, k) for k in ("rss_kb", "fds", "tasks", "db_bytes")}
            result["limits"] = {"fds": fd_limit, "tasks": task_limit}
            result["daemon_log"] = daemon.log_summary()
            result["verdict"] = verdict(result, p)
    return result


def verdict(result: dict[str, Any], p: SoakParams) -> dict[str, Any]:
    base, final, counts = result["baseline"], result["final"], result["counts"]
    problems: list[str] = []
    leaks: list[str] = []
    fd_key = "fds_adjusted"
    if final.get(fd_key) is None or base.get(fd_key) is None:
        problems.append("fd count unknown")
    elif final[fd_key] > base[fd_key] + p.fd_tolerance:
        leaks.append(f"fds {final[fd_key]} > baseline {base[fd_key]:g} + {p.fd_tolerance}")
    if final.get("tasks") is None or base.get("tasks") is None:
        problems.append("trio task count unknown (pocketbridge_trio_tasks missing from /metrics)")
    elif final["tasks"] > base["tasks"] + p.task_tolerance:
        leaks.append(f"trio tasks {final['tasks']} > baseline {base['tasks']:g} + {p.task_tolerance}")
    if final.get("connections_open"):
        leaks.append(f"{final['connections_open']} connections still open with no client left")
    for name in ACTIVITIES:
        if not counts.get(name):
            problems.append(f"no {name.replace('_', ' ')}")
    for name in ("event_losses", "event_duplicates", "replay_losses", "replay_duplicates"):
        if counts.get(name):
            problems.append(f"{counts[name]} {name.replace('_', ' ')}")
    if result["errors"]["count"]:
        problems.append(f"{result['errors']['count']} errors")
    return {"ok": not leaks and not problems, "leak": bool(leaks), "leaks": leaks, "problems": problems}


# --- entry point ---------------------------------------------------------------------------------------


async def _run(args: argparse.Namespace, p: SoakParams, choice: BackendChoice) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        result = await run_soak(args, p, choice)
    except Exception as exc:  # noqa: BLE001  (reported, exit 1; RuntimeError: the daemon did not start)
        if not isinstance(exc, BenchError | RuntimeError | OSError | trio.TooSlowError):
            traceback.print_exc()
        result = {"error": describe(exc)}
        print(f"[bench] soak failed: {result['error']}", file=sys.stderr, flush=True)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    return result


def main(args: argparse.Namespace) -> int:
    try:
        if args.url:
            raise BenchError("--scenario soak starts and watches its own daemon; --url is not supported")
        p = SoakParams.from_args(args)
        choice = backend_choice(args)
        if choice.instances != 1 or choice.bus != "memory":
            raise BenchError("--scenario soak runs one daemon with the memory bus (no --instances, no --bus redis)")
    except BenchError as exc:
        print(f"pocketbridge bench: {exc}", file=sys.stderr)
        return 2
    nofile = raise_nofile()  # inherited by the daemon
    jif0 = machine_jiffies()
    time.sleep(1.0)
    background = busy_cores(jif0, machine_jiffies())
    summary: dict[str, Any] = {
        "pocketbridge": __version__,
        "scenario": "soak",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**machine_info(), "busy_cores_before_start": background and background["busy"]},
        "command": " ".join(["pocketbridge", *sys.argv[1:]]) if sys.argv else None,
        "target": "daemon subprocess (python -m pocketbridge serve, fresh temp data dir)",
        "backend": choice.storage,
        "bus": choice.bus,
        "params": attrs.asdict(p),
        "rlimit_nofile": nofile[0],
    }
    try:
        shape: dict[tuple[str, str], Any] = {("storage", "backend"): choice.storage}
        if choice.storage == "postgres":
            shape[("storage", "dsn")] = "(the benchmark's own database)"
        probe = DaemonProcess(config_file=args.config, devices=Params().devices, log_level=args.daemon_log_level,
                              shared=shape)
        try:
            summary["daemon"] = describe_config(probe.config)
        finally:
            probe.stop()
        summary["soak"] = trio.run(_run, args, p, choice)
    except KeyboardInterrupt:
        print("pocketbridge bench: interrupted", file=sys.stderr)
        return 130
    print(render(summary), flush=True)
    text = json.dumps(summary, indent=2)
    print("\n" + text, flush=True)
    if args.json:
        Path(args.json).write_text(text + "\n")
    soak = summary["soak"]
    return 0 if "error" not in soak and soak["verdict"]["ok"] else 1

