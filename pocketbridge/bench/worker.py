"""``python -m pocketbridge.bench.worker``: one load-generator process, driven by the bench runner.

Protocol: one JSON command per line on stdin, one JSON reply per line on stdout (``{"ok": true, ...}`` or
``{"ok": false, "error": ...}``). End of stdin (the runner died or closed it) or ``{"cmd": "exit"}`` ends the
process, closing every connection. Every wait is bounded by the command's own timeouts.

Commands: ``relay_setup`` / ``relay_phase`` / ``relay_teardown`` (the relay scenario, connections kept across
phases), ``handshakes``, ``warmup``, ``idle_open`` / ``idle_close`` (memory) and ``replay``.

Event payloads (opaque to the server) are ``phase (1 byte) ‖ counter (8 bytes, big-endian, per sender) ‖
send time (8 bytes, time.time_ns, the *scheduled* time in open loop) ‖ padding``.
"""

from __future__ import annotations

import base64
import functools
import gc
import json
import math
import os
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import trio

from ..client import ClientError, DeviceKey, connect, event_message, new_device_id
from ..protocol.envelope import encode
from . import lean
from .lean import LeanClient
from .sysinfo import cpu_seconds, own_cpu, raise_nofile

STREAM = "clipboard:bench"
TYPE = "clipboard:text"
HEADER = struct.Struct(">BQQ")  # phase, counter, time_ns
OPEN_TIMEOUT = 30.0


def describe(exc: BaseException) -> str:
    """A short text for an exception, looking inside (single-member) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(sorted({describe(e) for e in exc.exceptions}))[:500]
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def make_payload(phase: int, counter: int, t_ns: int, size: int) -> bytes:
    head = HEADER.pack(phase, counter, t_ns)
    return head + b"\xa5" * max(0, size - len(head))


async def sleep_until_wall(t: float, limit: float = 30.0) -> None:
    """Sleep until wall-clock time ``t`` (seconds since the epoch), at most ``limit`` seconds."""
    delay = t - time.time()
    if delay > 0:
        await trio.sleep(min(delay, limit))


def cpu_delta(before: dict[str, float]) -> dict[str, float]:
    after = own_cpu()
    return {k: round(after[k] - before[k], 3) for k in before}


def ms(ns: int) -> float:
    return round(ns / 1e6, 3)


# --- relay -------------------------------------------------------------------------------------------


class UserPhase:
    """One user's bookkeeping for one relay phase."""

    __slots__ = ("remaining", "seen", "sent", "statuses", "stored")

    def __init__(self, receivers: int) -> None:
        self.remaining: dict[int, int] = {}  # counter -> receivers still missing it
        self.seen: list[set[int]] = [set() for _ in range(receivers)]
        self.stored: set[int] = set()
        self.statuses: dict[str, int] = {}
        self.sent = 0


class Phase:
    """A relay phase of this worker: counters and latency samples shared by all its users."""

    def __init__(self, phase_id: int, instances: int = 1) -> None:
        self.id = phase_id
        self.lat_ack: list[float] = []
        self.lat_recv: list[float] = []
        self.lat_recv_by_instance: list[list[float]] = [[] for _ in range(instances)]  # by the receiver's instance
        self.lat_all: list[float] = []
        self.duplicates = 0
        self.stray = 0
        self.delivered_all = 0
        self.deliveries = 0
        self.last_ack_ns = 0
        self.last_all_ns = 0
        self.errors: list[str] = []
        self.outstanding = 0  # events (of all users) some receiver still misses
        self.sending = True
        self.drained = trio.Event()  # set once sending is over and nothing is outstanding

    def settle(self, removed: int = 0) -> None:
        self.outstanding -= removed
        if not self.sending and self.outstanding <= 0:
            self.drained.set()


class UserRig:
    """One user: a sender device and D-1 receivers (same identity key, distinct device ids), on the lean client
    (:mod:`pocketbridge.bench.lean`): one task per connection, which records each event or ack as it is read.

    With several daemon URLs (instances sharing the database and bus), the sender connects to the first and
    receiver ``i`` to URL ``(index + i) % N``: a user's receivers alternate over the instances (so that relay
    crosses instances), starting on a different one for consecutive users.
    """

    def __init__(self, index: int, devices: int) -> None:
        self.index = index  # global user index (all workers)
        self.key = DeviceKey.generate()
        self.devices = devices
        self.receiver_instance: list[int] = []
        self.sender: LeanClient | None = None
        self.receivers: list[LeanClient] = []
        self.counter = 0
        self.phase: Phase | None = None
        self.up: UserPhase | None = None
        self.ready = trio.Event()
        self.error: str | None = None
        self.receiver_errors: list[str] = []
        self.inflight: dict[int, tuple[int, int]] = {}  # device_seq -> (counter, send time_ns) awaiting its ack
        self.on_acked: Callable[[], None] | None = None  # the closed loop's window
        self.acks_done: trio.Event | None = None  # set when nothing is in flight any more
        self.sending: trio.CancelScope | None = None  # cancelled when the sender's connection ends
        self.sender_error: str | None = None

    async def run(self, urls: list[str], stop: trio.Event) -> None:
        try:
            with trio.CancelScope(deadline=trio.current_time() + OPEN_TIMEOUT) as scope:
                async with AsyncExitStack() as stack:
                    for i in range(self.devices - 1):
                        instance = (self.index + i) % len(urls)
                        self.receivers.append(
                            await stack.enter_async_context(lean.connect(urls[instance], self.key, new_device_id()))
                        )
                        self.receiver_instance.append(instance)
                    self.sender = await stack.enter_async_context(lean.connect(urls[0], self.key, new_device_id()))
                    scope.deadline = math.inf
                    self.ready.set()
                    async with trio.open_nursery() as nursery:
                        for i, client in enumerate(self.receivers):
                            nursery.start_soon(self.receive_loop, i, client)
                        nursery.start_soon(self.ack_loop, self.sender)
                        await stop.wait()
                        nursery.cancel_scope.cancel()
            if scope.cancelled_caught and not self.ready.is_set():
                self.error = f"user {self.index}: connections not established within {OPEN_TIMEOUT:g} s"
        except Exception as exc:  # noqa: BLE001  (reported to the runner, which fails the scenario)
            self.error = f"user {self.index}: {describe(exc)}"
        finally:
            self.ready.set()

    # -- receiving ----------------------------------------------------------------------------------------
    async def receive_loop(self, i: int, client: LeanClient) -> None:
        try:
            await client.ws.run(functools.partial(self.on_receiver_message, i))
        except ClientError as exc:
            self.receiver_errors.append(f"user {self.index} receiver {i}: {describe(exc)}")

    def on_receiver_message(self, i: int, text: str) -> str | None:
        """A message to receiver ``i``: an event is counted and acked (by device_seq only, as web clients do)."""
        msg = json.loads(text)
        if msg.get("type") != "event":
            return None
        now = time.time_ns()
        event = msg["payload"]
        self.on_event(i, base64.b64decode(event["encrypted_payload"]), now)
        return encode({"type": "ack", "payload": {"device_seq": event["device_seq"]}})

    def on_event(self, i: int, payload: bytes, now: int) -> None:
        phase_id, counter, t_ns = HEADER.unpack_from(payload)
        ph, up = self.phase, self.up
        if ph is None or up is None or phase_id != ph.id:
            if ph is not None:
                ph.stray += 1
            return
        seen = up.seen[i]
        if counter in seen:
            ph.duplicates += 1
            return
        seen.add(counter)
        ph.deliveries += 1
        ph.lat_recv.append(ms(now - t_ns))
        ph.lat_recv_by_instance[self.receiver_instance[i]].append(ms(now - t_ns))
        left = up.remaining.get(counter)
        if left is not None:
            if left <= 1:
                del up.remaining[counter]
                ph.settle(1)
                ph.delivered_all += 1
                ph.lat_all.append(ms(now - t_ns))
                ph.last_all_ns = max(ph.last_all_ns, now)
            else:
                up.remaining[counter] = left - 1

    async def ack_loop(self, sender: LeanClient) -> None:
        try:
            await sender.ws.run(self.on_sender_message)
        except ClientError as exc:
            self.sender_error = f"user {self.index} sender: {describe(exc)}"
            if self.sending is not None:
                self.sending.cancel()

    def on_sender_message(self, text: str) -> None:
        """A message to the sender: an ack is counted (the server acks in order)."""
        msg = json.loads(text)
        if msg.get("type") != "ack":
            return
        now = time.time_ns()
        ack = msg["payload"]
        sent = self.inflight.pop(ack.get("device_seq"), None)
        up, ph = self.up, self.phase
        if sent is None or up is None or ph is None:
            return
        counter, t_ns = sent
        status = ack.get("status", "stored")
        up.statuses[status] = up.statuses.get(status, 0) + 1
        if status == "stored":
            up.stored.add(counter)
        elif up.remaining.pop(counter, None):  # never relayed
            ph.settle(1)
        ph.lat_ack.append(ms(now - t_ns))
        ph.last_ack_ns = max(ph.last_ack_ns, now)
        if self.on_acked is not None:
            self.on_acked()
        if not self.inflight and self.acks_done is not None:
            self.acks_done.set()

    # -- sending ------------------------------------------------------------------------------------
    async def _post(self, t_ns: int, payload_bytes: int) -> None:
        sender, up, ph = self.sender, self.up, self.phase
        assert sender is not None and up is not None and ph is not None
        self.counter += 1
        counter = self.counter
        up.remaining[counter] = len(self.receivers)
        if self.receivers:
            ph.outstanding += 1
        up.sent += 1
        seq = sender.take_seq()
        self.inflight[seq] = (counter, t_ns)
        message = event_message(
            sender.user_id, sender.device_id, seq, STREAM, TYPE, make_payload(ph.id, counter, t_ns, payload_bytes)
        )
        await sender.ws.send_message(encode(message))

    async def _sending(self, send: Callable[[], Awaitable[None]]) -> None:
        """Run ``send``, then wait for the acks of what is in flight; stopped (and reported) if the sender's
        connection ends. The caller bounds the whole."""
        with trio.CancelScope() as self.sending:
            if self.sender_error is None:
                await send()
                if self.inflight:
                    self.acks_done = trio.Event()
                    await self.acks_done.wait()
        self.sending = self.acks_done = None
        if self.sender_error is not None:
            raise ClientError(self.sender_error)

    async def send_closed(self, end_ns: int, window: int, payload_bytes: int, max_events: int) -> None:
        """As fast as acks allow, ``window`` events in flight, until ``end_ns`` or ``max_events``."""
        sem = trio.Semaphore(window)

        async def send() -> None:
            for _ in range(max_events):
                await sem.acquire()
                t_ns = time.time_ns()
                if t_ns >= end_ns:
                    break
                await self._post(t_ns, payload_bytes)

        self.on_acked = sem.release
        try:
            await self._sending(send)
        finally:
            self.on_acked = None

    async def send_open(self, start_ns: int, end_ns: int, rate: float, offset_ns: int, payload_bytes: int) -> None:
        """On a fixed timetable (``rate`` per second from ``start_ns + offset_ns``), whatever the acks do."""
        interval = 1e9 / rate
        total = max(0, math.ceil((end_ns - start_ns - offset_ns) / interval))

        async def send() -> None:
            for i in range(total):
                t_ns = start_ns + offset_ns + int(i * interval)
                if t_ns >= end_ns:
                    break
                delay = (t_ns - time.time_ns()) / 1e9
                if delay > 0:
                    await trio.sleep(delay)
                await self._post(t_ns, payload_bytes)

        await self._sending(send)


class Worker:
    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self.rigs: list[UserRig] = []
        self.relay_stop = trio.Event()
        self.relay_done = trio.Event()
        self.idle_stop = trio.Event()
        self.idle_done = trio.Event()
        self.idle_opened = 0
        self.idle_failed: list[str] = []
        self.payload_bytes = 256
        self.instances = 1

    # -- relay ----------------------------------------------------------------------------------------
    async def relay_setup(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.nursery is not None
        urls: list[str] = list(cmd.get("urls") or [cmd["url"]])
        users, offset, devices = cmd["users"], cmd["user_offset"], cmd["devices"]
        self.instances = len(urls)
        self.payload_bytes = int(cmd.get("payload_bytes", 256))
        self.rigs = [UserRig(offset + i, devices) for i in range(users)]
        self.relay_stop = trio.Event()
        self.relay_done = trio.Event()
        t0 = time.perf_counter()

        async def hold_all() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    for rig in self.rigs:
                        nursery.start_soon(rig.run, urls, self.relay_stop)
            finally:
                self.relay_done.set()

        self.nursery.start_soon(hold_all)
        with trio.move_on_after(OPEN_TIMEOUT + 5):
            for rig in self.rigs:
                await rig.ready.wait()
        errors = [r.error for r in self.rigs if r.error] + [
            f"user {r.index}: not ready" for r in self.rigs if not r.ready.is_set()
        ]
        if errors:
            raise RuntimeError("; ".join(errors[:5]))
        return {"connections": users * devices, "setup_s": round(time.perf_counter() - t0, 3)}

    async def relay_phase(self, cmd: dict[str, Any]) -> dict[str, Any]:
        phase = Phase(int(cmd["phase"]), self.instances)
        duration, drain = float(cmd["duration"]), float(cmd["drain"])
        for rig in self.rigs:
            rig.up = UserPhase(len(rig.receivers))
            rig.phase = phase
        # the generator's own full collections (~15 ms of its imports and clients) would count as the daemon's latency
        gc.collect()
        gc.freeze()
        await sleep_until_wall(float(cmd["start_at"]))
        cpu0 = own_cpu()
        start_ns = time.time_ns()
        end_ns = start_ns + int(duration * 1e9)

        async def sender(rig: UserRig) -> None:
            try:
                if cmd["mode"] == "closed":
                    await rig.send_closed(end_ns, int(cmd["window"]), self.payload_bytes, int(cmd["max_events"]))
                else:
                    per_user = float(cmd["rate_per_user"])
                    offset_ns = int(float(cmd["offset_step_s"]) * 1e9 * rig.index) % int(1e9 / per_user)
                    await rig.send_open(start_ns, end_ns, per_user, offset_ns, self.payload_bytes)
            except Exception as exc:  # noqa: BLE001  (Closed, maybe in an exception group: report, keep measuring)
                phase.errors.append(f"user {rig.index} sender: {describe(exc)}")

        # sending (plus the acks of what is in flight), bounded; then a bounded drain for deliveries
        with trio.move_on_after(duration + drain) as send_scope:
            async with trio.open_nursery() as nursery:
                for rig in self.rigs:
                    nursery.start_soon(sender, rig)
        send_end_ns = time.time_ns()
        if send_scope.cancelled_caught:
            phase.errors.append("sending or acks did not finish within duration + drain")
        phase.sending = False
        phase.settle()
        with trio.move_on_after(drain):
            await phase.drained.wait()
        cpu = cpu_delta(cpu0)
        end_ns = time.time_ns()
        # losses: stored (acked) events some receiver never got within the drain time
        losses = sent = unacked = 0
        statuses: dict[str, int] = {}
        for rig in self.rigs:
            up = rig.up
            assert up is not None
            sent += up.sent
            unacked += up.sent - sum(up.statuses.values())
            for k, v in up.statuses.items():
                statuses[k] = statuses.get(k, 0) + v
            for seen in up.seen:
                losses += len(up.stored - seen)
        errors = phase.errors + [e for r in self.rigs for e in r.receiver_errors]
        for rig in self.rigs:
            rig.receiver_errors.clear()
        return {
            "start_ns": start_ns,
            "send_end_ns": send_end_ns,
            "end_ns": end_ns,
            "last_ack_ns": phase.last_ack_ns,
            "last_all_ns": phase.last_all_ns,
            "sent": sent,
            "statuses": statuses,
            "acked_stored": statuses.get("stored", 0),
            "unacked": unacked,
            "delivered_all": phase.delivered_all,
            "deliveries": phase.deliveries,
            "duplicates": phase.duplicates,
            "losses": losses,
            "stray": phase.stray,
            "receivers": sum(len(r.receivers) for r in self.rigs),
            "lat_ack_ms": phase.lat_ack,
            "lat_recv_ms": phase.lat_recv,
            "lat_recv_ms_by_instance": phase.lat_recv_by_instance,
            "lat_all_ms": phase.lat_all,
            "cpu": cpu,
            "errors": errors[:20],
        }

    async def relay_teardown(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.relay_stop.set()
        with trio.move_on_after(float(cmd.get("timeout", 15))):
            await self.relay_done.wait()
        self.rigs = []
        return {"closed": self.relay_done.is_set()}

    # -- handshakes --------------------------------------------------------------------------------------
    async def handshakes(self, cmd: dict[str, Any]) -> dict[str, Any]:
        url, count, concurrency = cmd["url"], int(cmd["count"]), max(1, int(cmd["concurrency"]))
        timeout = float(cmd.get("timeout", 30))
        creds = [(DeviceKey.generate(), new_device_id()) for _ in range(count)]  # before timing starts
        await sleep_until_wall(float(cmd["start_at"]))
        latencies: list[float] = []
        failures: list[str] = []
        sem = trio.Semaphore(concurrency)

        async def one(key: DeviceKey, device_id: str) -> None:
            async with sem:
                t0 = time.perf_counter_ns()
                try:
                    with trio.fail_after(timeout):
                        async with connect(url, key, device_id, handshake_timeout=timeout):
                            latencies.append(ms(time.perf_counter_ns() - t0))
                except Exception as exc:  # noqa: BLE001  (a failed handshake is a counted result)
                    failures.append(describe(exc))

        cpu0 = own_cpu()
        start_ns = time.time_ns()
        with trio.move_on_after(timeout * (count / concurrency + 2)):
            async with trio.open_nursery() as nursery:
                for key, device_id in creds:
                    nursery.start_soon(one, key, device_id)
        end_ns = time.time_ns()
        return {
            "start_ns": start_ns,
            "end_ns": end_ns,
            "completed": len(latencies),
            "failed": count - len(latencies),
            "failures": sorted(set(failures))[:10],
            "lat_ms": latencies,
            "cpu": cpu_delta(cpu0),
        }

    # -- memory --------------------------------------------------------------------------------------
    async def warmup(self, cmd: dict[str, Any]) -> dict[str, Any]:
        key = DeviceKey.generate()
        with trio.fail_after(float(cmd.get("timeout", 30))):
            async with connect(cmd["url"], key, new_device_id()) as client:
                ack = await client.send_event(STREAM, TYPE, make_payload(0, 1, time.time_ns(), 64))
                await client.ping()
        return {"status": ack.status}

    async def idle_open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.nursery is not None
        url, count, concurrency = cmd["url"], int(cmd["count"]), max(1, int(cmd["concurrency"]))
        creds = [(DeviceKey.generate(), new_device_id()) for _ in range(count)]
        self.idle_stop, self.idle_done = trio.Event(), trio.Event()
        self.idle_opened, self.idle_failed = 0, []
        settled = trio.Event()
        sem = trio.Semaphore(concurrency)

        def note() -> None:
            if self.idle_opened + len(self.idle_failed) >= count:
                settled.set()

        async def hold(key: DeviceKey, device_id: str) -> None:
            await sem.acquire()
            released = False
            try:
                with trio.CancelScope(deadline=trio.current_time() + OPEN_TIMEOUT) as scope:
                    async with connect(url, key, device_id) as client:
                        scope.deadline = math.inf
                        sem.release()
                        released = True
                        self.idle_opened += 1
                        note()
                        await self.idle_stop.wait()
                        await client.close()
                if scope.cancelled_caught and not released:
                    self.idle_failed.append("open timeout")
                    note()
            except Exception as exc:  # noqa: BLE001  (a connection that fails to open is a counted result)
                if not released:
                    self.idle_failed.append(describe(exc))
                    note()
            finally:
                if not released:
                    sem.release()

        async def hold_all() -> None:
            try:
                async with trio.open_nursery() as nursery:
                    for key, device_id in creds:
                        nursery.start_soon(hold, key, device_id)
            finally:
                self.idle_done.set()

        t0 = time.perf_counter()
        self.nursery.start_soon(hold_all)
        with trio.move_on_after(OPEN_TIMEOUT * (count / concurrency + 2)):
            await settled.wait()
        return {
            "opened": self.idle_opened,
            "failed": len(self.idle_failed),
            "failures": sorted(set(self.idle_failed))[:10],
            "open_s": round(time.perf_counter() - t0, 3),
        }

    async def idle_close(self, cmd: dict[str, Any]) -> dict[str, Any]:
        still_open = self.idle_opened
        self.idle_stop.set()
        with trio.move_on_after(float(cmd.get("timeout", 30))):
            await self.idle_done.wait()
        return {"closed": self.idle_done.is_set(), "were_open": still_open}

    # -- replay ----------------------------------------------------------------------------------------
    async def replay(self, cmd: dict[str, Any]) -> dict[str, Any]:
        url, events, window = cmd["url"], int(cmd["events"]), int(cmd["window"])
        replay_url = cmd.get("replay_url") or url  # another instance: replay through the shared store
        timeout = float(cmd.get("timeout", 120))
        rig = UserRig(0, 1)
        rig.phase, rig.up = Phase(1), UserPhase(0)
        out: dict[str, Any] = {"events": events, "pages": []}
        with trio.fail_after(timeout):
            async with lean.connect(url, rig.key, new_device_id(), device_type=None) as sender:
                rig.sender = sender
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(rig.ack_loop, sender)
                    cpu0 = own_cpu()
                    t0 = time.perf_counter()
                    await rig.send_closed(time.time_ns() + int(timeout * 1e9), window, self.payload_bytes, events)
                    store_s = time.perf_counter() - t0
                    nursery.cancel_scope.cancel()
            stored = rig.up.statuses.get("stored", 0)
            out.update(
                stored=stored,
                store_s=round(store_s, 3),
                store_events_per_s=round(stored / store_s, 1) if store_s > 0 else None,
                store_cpu=cpu_delta(cpu0),
            )
            pid = cmd.get("daemon_pid")
            for page_size in cmd["page_sizes"]:
                async with lean.connect(replay_url, rig.key, new_device_id(), device_type=None) as device:
                    cpu0 = own_cpu()
                    daemon0 = cpu_seconds(pid) if pid else None
                    t0 = time.perf_counter()
                    result = await device.replay(limit=int(page_size), ack=True)
                    elapsed = time.perf_counter() - t0
                    await device.ping()  # the server has processed every ack once the pong is back
                    acked_s = time.perf_counter() - t0
                    cpu = cpu_delta(cpu0)
                    daemon1 = cpu_seconds(pid) if pid else None
                counters = [HEADER.unpack_from(e.payload)[1] for e in result.events]
                unique = set(counters)
                out["pages"].append(
                    {
                        "page_size": int(page_size),
                        "pages": result.pages,
                        "received": len(counters),
                        "total_events": result.total_events,
                        "full_resync": result.full_resync is not None,
                        "duplicates": len(counters) - len(unique),
                        "losses": len(rig.up.stored - unique),
                        "seconds": round(elapsed, 4),
                        "events_per_s": round(len(counters) / elapsed, 1) if elapsed > 0 else None,
                        "seconds_incl_acks": round(acked_s, 4),
                        "cpu": cpu,
                        "client_cpu_pct": round(100 * (cpu["user"] + cpu["sys"]) / acked_s, 1),
                        "daemon_cpu_pct": (
                            round(100 * (daemon1 - daemon0) / acked_s, 1)
                            if daemon0 is not None and daemon1 is not None
                            else None
                        ),
                    }
                )
        return out


HANDLERS: dict[str, Callable[[Worker, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "relay_setup": Worker.relay_setup,
    "relay_phase": Worker.relay_phase,
    "relay_teardown": Worker.relay_teardown,
    "handshakes": Worker.handshakes,
    "warmup": Worker.warmup,
    "idle_open": Worker.idle_open,
    "idle_close": Worker.idle_close,
    "replay": Worker.replay,
}


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                if buf.strip():
                    yield buf
                return
            buf += chunk
        line, _, buf = buf.partition(b"\n")
        if line.strip():
            yield line


async def serve(stdin: trio.abc.ReceiveStream) -> None:
    worker = Worker()
    async with trio.open_nursery() as nursery:
        worker.nursery = nursery
        try:
            async for line in _lines(stdin):
                cmd = json.loads(line)
                if cmd.get("cmd") == "exit":
                    break
                handler = HANDLERS.get(cmd.get("cmd", ""))
                try:
                    if handler is None:
                        raise ValueError(f"unknown command {cmd.get('cmd')!r}")
                    reply = {"ok": True, **(await handler(worker, cmd))}
                except Exception as exc:  # noqa: BLE001  (the worker survives and reports any failure)
                    reply = {"ok": False, "error": describe(exc)}
                sys.stdout.write(json.dumps(reply, separators=(",", ":")) + "\n")
                sys.stdout.flush()
        finally:
            worker.relay_stop.set()
            worker.idle_stop.set()
            nursery.cancel_scope.cancel()


def main() -> None:
    raise_nofile()
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    trio.run(serve, stdin)


if __name__ == "__main__":
    main()
