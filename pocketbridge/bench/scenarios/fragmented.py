"""fragmented: what a message arriving in many small fragments costs the daemon in memory.

Over one established connection (a raw WebSocket client, wire.py, with the hand-made handshake), a text message of
``--message-mib`` MiB (an app ping padded with ``x``) is streamed as continuation frames of ``--fragment-bytes``
bytes each, while the daemon's RSS (VmRSS) is sampled. Once the daemon has read every fragment (a protocol ping
sent after them is answered) the RSS growth over the idle connection's (after a warm-up message in the same
fragments) is the cost of the message being assembled; the last fragment then completes it, and its pong shows it
was delivered. Each fragment size runs on a fresh daemon (a process keeps the memory of a message it has freed)
that allows enough fragments per message ([ws] max_fragments_per_message); one more daemon with the default
setting shows what a client sending one fragment too many gets: a 1009 close. Run from this process.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto.events import CloseConnection, Ping, Pong

from ...client import DeviceKey
from ...config import WsConfig
from ..env import Env, start_daemon, stop_daemon
from ..params import BenchError
from ..sysinfo import rss_kb
from ..wire import CONTINUATION, PING, TEXT, RawHandshake, WireSocket, build_frame, expect_close

KiB, MiB = 1024, 1024 * 1024
HEAD, TAIL = b'{"type":"ping","payload":{"pad":"', b'"}}'
BATCH_BYTES = 256 * KiB  # wire bytes written at once
STEP_TIMEOUT = 120.0  # a handshake, a batch write, a round trip


@attrs.define
class FragmentParams:
    message_mib: float = 16.0
    fragment_bytes: list[int] = attrs.Factory(lambda: [4096, 64])
    sample_interval_s: float = 0.1
    warmup_kib: int = 256

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FragmentParams:
        p = cls(message_mib=1.0, fragment_bytes=[64]) if args.quick else cls()
        if getattr(args, "message_mib", None) is not None:
            p.message_mib = args.message_mib
        if getattr(args, "fragment_bytes", None):
            p.fragment_bytes = list(args.fragment_bytes)
        limit = WsConfig().max_message_bytes
        if p.message_bytes > limit:
            raise BenchError(f"--message-mib must be at most {limit / MiB:g} (the default [ws] max_message_bytes)")
        if p.message_bytes < len(HEAD) + len(TAIL) + max(p.fragment_bytes):
            raise BenchError("--message-mib is too small for one fragment")
        return p

    @property
    def message_bytes(self) -> int:
        return int(self.message_mib * MiB)

    @property
    def max_fragments(self) -> int:
        """Enough for the message in the smallest fragments (the head, the padding, the tail)."""
        return math.ceil(self.message_bytes / min(self.fragment_bytes)) + 16


def settings(p: FragmentParams) -> dict[tuple[str, str], Any]:
    """Enough fragments per message; and the heartbeat slowed down: the client reads nothing (so answers no
    ping) while it streams, which may take minutes in tiny fragments."""
    return {
        ("ws", "max_fragments_per_message"): p.max_fragments,
        ("ws", "ping_interval"): 600,
        ("ws", "pong_timeout"): 1200,
    }


def progress(text: str) -> None:
    print(f"[bench] fragmented: {text}", file=sys.stderr, flush=True)


async def roundtrip(ws: WireSocket, payload: bytes) -> None:
    """A protocol ping and its pong: the daemon has read everything sent before it (messages meanwhile are
    dropped; a close is ConnectionClosed)."""
    await ws.send_raw(build_frame(PING, payload))
    while True:
        for event in ws.ws.events():
            if isinstance(event, Pong) and event.payload == payload:
                return
            if isinstance(event, Ping):
                await ws.send_raw(ws.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise ConnectionClosed(CloseReason(event.code, event.reason or None))
        data = await ws.stream.receive_some(1 << 16)
        if not data:
            raise ConnectionClosed(CloseReason(1006, None))
        ws.ws.receive_data(data)


async def next_text(ws: WireSocket) -> str:
    """The next whole text message (answering pings)."""
    message = await ws.get_message()
    return message if isinstance(message, str) else message.decode()


class Stream:
    """One fragmented message: the head frame, padding in continuation frames of ``size`` bytes, the tail frame."""

    def __init__(self, message_bytes: int, size: int) -> None:
        self.size = size
        self.padding = message_bytes - len(HEAD) - len(TAIL)
        self.frame = build_frame(CONTINUATION, b"x" * size, fin=False)
        self.per_batch = max(1, BATCH_BYTES // len(self.frame))
        self.batch = self.frame * self.per_batch  # the same mask for each: fine, any mask is
        self.frames = 0  # sent so far
        self.sent = 0  # message bytes sent so far
        self.wire = 0  # bytes on the wire so far

    async def _send(self, ws: WireSocket, data: bytes, frames: int, payload: int) -> None:
        with trio.fail_after(STEP_TIMEOUT):
            await ws.send_raw(data)
        self.frames += frames
        self.sent += payload
        self.wire += len(data)

    async def body(self, ws: WireSocket) -> None:
        """Everything but the tail: the message is then incomplete."""
        await self._send(ws, build_frame(TEXT, HEAD, fin=False), 1, len(HEAD))
        full, rest = divmod(self.padding, self.size)
        batches, frames = divmod(full, self.per_batch)
        for _ in range(batches):
            await self._send(ws, self.batch, self.per_batch, self.per_batch * self.size)
        last = self.frame * frames + (build_frame(CONTINUATION, b"x" * rest, fin=False) if rest else b"")
        if last:
            await self._send(ws, last, frames + (1 if rest else 0), frames * self.size + rest)

    async def tail(self, ws: WireSocket) -> None:
        await self._send(ws, build_frame(CONTINUATION, TAIL, fin=True), 1, len(TAIL))


async def steady_rss(pid: int) -> int:
    values = []
    for _ in range(3):
        values.append(rss_kb(pid) or 0)
        await trio.sleep(0.1)
    return int(statistics.median(values))


async def one_message(url: str, pid: int, p: FragmentParams, size: int) -> dict[str, Any]:
    """A fresh connection, a warm-up message in the same fragments, then the measured message."""
    async with WireSocket.open(url, timeout=STEP_TIMEOUT) as ws:
        await RawHandshake(ws, DeviceKey.generate(), timeout=STEP_TIMEOUT).run()
        warm = Stream(p.warmup_kib * KiB, size)
        await warm.body(ws)
        await warm.tail(ws)
        with trio.fail_after(STEP_TIMEOUT):
            pong = await next_text(ws)
            await roundtrip(ws, b"warm")
        if '"pong"' not in pong:
            raise BenchError(f"the warm-up message got {pong[:200]!r}, not a pong")
        await trio.sleep(0.5)
        base = await steady_rss(pid)
        samples: list[tuple[float, int, int]] = []  # (seconds, message bytes sent, RSS growth kB)
        message = Stream(p.message_bytes, size)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:

            async def sample() -> None:
                while True:
                    samples.append((time.perf_counter() - t0, message.sent, (rss_kb(pid) or 0) - base))
                    await trio.sleep(p.sample_interval_s)

            nursery.start_soon(sample)
            await message.body(ws)
            with trio.fail_after(STEP_TIMEOUT):
                await roundtrip(ws, b"read")  # the daemon has read every fragment
            seconds = time.perf_counter() - t0
            await trio.sleep(0.3)
            assembled = await steady_rss(pid) - base
            await message.tail(ws)
            with trio.fail_after(STEP_TIMEOUT):
                reply = await next_text(ws)
                await roundtrip(ws, b"done")
            nursery.cancel_scope.cancel()
        delivered = '"pong"' in reply
    await trio.sleep(0.5)
    after_close = await steady_rss(pid) - base
    peak = max([g for _, _, g in samples] + [assembled])
    return {
        "fragment_bytes": size,
        "label": f"{size} B",
        "frames": message.frames,
        "message_bytes": message.sent,
        "wire_bytes": message.wire,
        "seconds": round(seconds, 2),
        "mib_per_s": round(message.sent / MiB / seconds, 2) if seconds > 0 else None,
        "frames_per_s": round(message.frames / seconds) if seconds > 0 else None,
        "rss_base_kb": base,
        "rss_growth_kb": assembled,
        "growth_per_byte": round(assembled * KiB / message.sent, 3),
        "peak_growth_kb": peak,
        "growth_after_close_kb": after_close,
        "delivered": delivered,
        "samples": [{"t": round(t, 2), "sent_bytes": b, "rss_growth_kb": g} for t, b, g in samples],
    }


async def default_cap(url: str, pid: int, cap: int) -> dict[str, Any]:
    """At the default limit: ``cap`` frames of a message are fine; one more is answered with a 1009 close."""
    async with WireSocket.open(url, timeout=STEP_TIMEOUT) as ws:
        await RawHandshake(ws, DeviceKey.generate(), timeout=STEP_TIMEOUT).run()
        base = await steady_rss(pid)
        frame = build_frame(CONTINUATION, b"x" * 64, fin=False)
        await ws.send_raw(build_frame(TEXT, HEAD, fin=False) + frame * (cap - 1))
        with trio.fail_after(STEP_TIMEOUT):
            await roundtrip(ws, b"at the cap")  # still open
        grown = await steady_rss(pid) - base
        await ws.send_raw(frame)
        code, reason = await expect_close(ws, STEP_TIMEOUT)
    return {
        "max_fragments": cap,
        "frames_sent": cap + 1,
        "bytes_sent": len(HEAD) + cap * 64,
        "open_after_frames": cap,
        "close_code": code,
        "close_reason": reason,
        "rss_growth_kb": grown,
    }


async def run(env: Env, p: FragmentParams) -> dict[str, Any]:
    pid = env.pid
    if pid is None or env.args is None:
        raise BenchError("the fragmented scenario needs the daemon it starts")
    runs = []
    for i, size in enumerate(p.fragment_bytes):
        frames = math.ceil(p.message_bytes / size)
        progress(f"{p.message_mib:g} MiB in {size}-byte fragments ({frames:,} frames) ...")
        if i == 0:
            runs.append(await one_message(env.url, pid, p, size))
        else:  # a fresh daemon: the memory of the last message stays with the process (the allocator keeps it)
            daemon = await start_daemon(env.args, 2, settings=settings(p))
            try:
                assert daemon.pid is not None
                runs.append(await one_message(daemon.url, daemon.pid, p, size))
            finally:
                await stop_daemon(daemon)
        r = runs[-1]
        progress(
            f"{r['seconds']:.1f} s, RSS +{r['rss_growth_kb'] / 1024:.1f} MiB while assembling "
            f"(peak +{r['peak_growth_kb'] / 1024:.1f} MiB)"
        )
    cap = WsConfig().max_fragments_per_message
    progress(f"a daemon with the default max_fragments_per_message ({cap}) ...")
    daemon = await start_daemon(env.args, 2)
    try:
        assert daemon.pid is not None
        limit = await default_cap(daemon.url, daemon.pid, cap)
        log = daemon.log_summary()
    finally:
        await stop_daemon(daemon)
    failed = [f"{r['label']}: the message was not answered with a pong" for r in runs if not r["delivered"]]
    if (limit["close_code"], limit["close_reason"]) != (1009, "Message too big"):
        failed.append(f"default limit: closed with {limit['close_code']} {limit['close_reason']!r}, not 1009")
    return {
        "params": attrs.asdict(p),
        "message_mib": p.message_mib,
        "max_fragments": p.max_fragments,
        "sample_interval_s": p.sample_interval_s,
        "runs": runs,
        "default_cap": {**limit, "daemon_log": log},
        "daemon_settings": {f"{sec}.{name}": value for (sec, name), value in settings(p).items()},
        "failed_checks": failed,
    }
