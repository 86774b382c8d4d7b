"""Fragmented messages (protocol.md §1.2, §9): a message costs about its size in memory however it is cut
up; at most ``[ws] max_fragments_per_message`` fragments; at most ``[ws] max_handshake_message_bytes`` before
``session_established``. Every refusal is a 1009 ``Message too big`` close frame."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection

from pocketbridge.app import Running
from pocketbridge.bench.launcher import running
from pocketbridge.bench.scenarios.fragmented import roundtrip
from pocketbridge.client import DeviceKey
from pocketbridge.config import Config
from tests.conftest import run_daemon
from tests.e2e.rawclient import (
    RawHandshake,
    WireSocket,
    assert_close,
    assert_no_tracebacks,
    build_frame,
    dumps,
    e2e_config,
    event_body,
    expect_close,
    open_ws,
    recv_json,
    send,
)

TEXT, BINARY, CONTINUATION, PING = 0x1, 0x2, 0x0, 0x9
TOO_BIG = (1009, "Message too big")
EXPECTED_HELLO = (1008, "Invalid handshake step: expected client_hello")
HANDSHAKE_LIMIT = 64 * 1024  # [ws] max_handshake_message_bytes (default)
FRAGMENT_CAP = 16  # [ws] max_fragments_per_message in these tests
KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(autouse=True)
def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> Any:
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


@pytest.fixture
async def server(config_factory: Callable[..., Config]) -> AsyncIterator[Running]:
    config = e2e_config(config_factory, ws={"max_fragments_per_message": FRAGMENT_CAP, "max_message_bytes": 4 * MiB},
                        events={"max_payload_bytes": MiB})
    async with run_daemon(config) as (_, running_):
        yield running_


def ping_of_size(size: int) -> bytes:
    """An app ping of exactly ``size`` UTF-8 bytes."""
    head, tail = b'{"type":"ping","payload":{"pad":"', b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def fragmented(data: bytes, pieces: int, opcode: int = TEXT) -> bytes:
    """``data`` as one message of ``pieces`` frames (the last ones may be empty)."""
    step = -(-len(data) // pieces)
    chunks = [data[i * step:(i + 1) * step] for i in range(pieces)]
    return b"".join(
        build_frame(opcode if i == 0 else CONTINUATION, chunk, fin=i == pieces - 1) for i, chunk in enumerate(chunks)
    )


async def pong(ws: WireSocket | WebSocketConnection) -> None:
    assert (await recv_json(ws))["type"] == "pong"


# --- the limit before session_established -----------------------------------------------------------------------
async def test_message_over_handshake_limit_before_handshake_is_too_big(config_factory: Callable[..., Config]) -> None:
    async with run_daemon(e2e_config(config_factory)) as (_, running_):
        async with WireSocket.open(running_.ws_url) as ws:  # exactly the limit: read (and refused as a step)
            await ws.send_frame(TEXT, ping_of_size(HANDSHAKE_LIMIT))
            await assert_close(ws, *EXPECTED_HELLO)
        for opcode in (TEXT, BINARY):
            async with WireSocket.open(running_.ws_url) as ws:
                await ws.send_frame(opcode, ping_of_size(HANDSHAKE_LIMIT + 1))
                await assert_close(ws, *TOO_BIG)
        async with WireSocket.open(running_.ws_url) as ws:  # in fragments, each small
            await ws.send_raw(fragmented(ping_of_size(HANDSHAKE_LIMIT + 1), 8))
            await assert_close(ws, *TOO_BIG)
        async with WireSocket.open(running_.ws_url) as ws:  # after server_hello, before client_auth
            hs = RawHandshake(ws, DeviceKey.generate())
            await hs.hello()
            await hs.read_server_hello()
            await ws.send_frame(TEXT, ping_of_size(HANDSHAKE_LIMIT + 1))
            await assert_close(ws, *TOO_BIG)


async def test_after_handshake_the_message_limit_applies(config_factory: Callable[..., Config]) -> None:
    config = e2e_config(config_factory, ws={"max_message_bytes": MiB}, events={"max_payload_bytes": 512 * KiB})
    async with run_daemon(config) as (_, running_), WireSocket.open(running_.ws_url) as ws:
        await RawHandshake(ws, DeviceKey.generate()).run()
        await ws.send_frame(TEXT, ping_of_size(MiB))
        await pong(ws)
        await ws.send_raw(fragmented(ping_of_size(MiB), 8))
        await pong(ws)
        await ws.send_frame(TEXT, ping_of_size(MiB + 1))
        await assert_close(ws, *TOO_BIG)


async def test_handshake_limit_is_configurable(config_factory: Callable[..., Config]) -> None:
    config = e2e_config(config_factory, ws={"max_handshake_message_bytes": 1000})
    async with run_daemon(config) as (_, running_):
        async with open_ws(running_.ws_url) as ws:
            await send(ws, ping_of_size(1001).decode())
            await assert_close(ws, *TOO_BIG)
        async with open_ws(running_.ws_url) as ws:  # a real handshake fits; afterwards 1000 is no limit
            await RawHandshake(ws, DeviceKey.generate()).run()
            await send(ws, ping_of_size(10 * KiB).decode())
            await pong(ws)


# --- fragments per message ------------------------------------------------------------------------------------------
async def test_message_in_up_to_the_fragment_cap_is_accepted(server: Running) -> None:
    async with WireSocket.open(server.ws_url) as ws:
        hs = RawHandshake(ws, DeviceKey.generate())
        await ws.send_raw(fragmented(dumps(hs.hello_message()).encode(), FRAGMENT_CAP))  # before the handshake too
        await hs.read_server_hello()
        await ws.send_raw(fragmented(dumps(hs.auth_message()).encode(), 3, BINARY))
        await hs.read_established()
        await ws.send_raw(fragmented(ping_of_size(1000), FRAGMENT_CAP))
        await pong(ws)
        await ws.send_raw(fragmented(ping_of_size(3 * MiB), FRAGMENT_CAP))
        await pong(ws)
        body = event_body(hs.key.public_hex, hs.device_id, 1)
        await ws.send_raw(fragmented(dumps({"type": "event", "payload": body}).encode(), 5, BINARY))
        assert (await recv_json(ws))["payload"] == {"device_seq": 1, "event_id": body["event_id"], "status": "stored"}
        # a control frame between fragments is not a fragment
        data = ping_of_size(1000)
        await ws.send_raw(build_frame(TEXT, data[:500], fin=False) + build_frame(PING, b"p")
                          + build_frame(CONTINUATION, data[500:]))
        await pong(ws)


async def test_one_big_frame_is_one_fragment(server: Running) -> None:
    """A frame arrives over many reads; it still counts once."""
    async with WireSocket.open(server.ws_url) as ws:
        await RawHandshake(ws, DeviceKey.generate()).run()
        await ws.send_frame(TEXT, ping_of_size(3 * MiB))
        await pong(ws)
        await ws.send_raw(fragmented(ping_of_size(3 * MiB), 2))
        await pong(ws)


@pytest.mark.parametrize("handshake", [False, True], ids=["before-handshake", "after-handshake"])
@pytest.mark.parametrize("kind", ["text", "binary", "empty-fragments"])
async def test_more_fragments_than_the_cap_is_too_big(server: Running, handshake: bool, kind: str) -> None:
    async with WireSocket.open(server.ws_url) as ws:
        if handshake:
            await RawHandshake(ws, DeviceKey.generate()).run()
        data = ping_of_size(200)
        if kind == "empty-fragments":  # nothing but empty continuation frames after the first
            frames = build_frame(TEXT, data, fin=False) + build_frame(CONTINUATION, b"", fin=False) * FRAGMENT_CAP
        else:
            frames = fragmented(data, FRAGMENT_CAP + 1, BINARY if kind == "binary" else TEXT)
        await ws.send_raw(frames)
        assert await expect_close(ws) == TOO_BIG


async def test_the_fragment_cap_counts_per_message(server: Running) -> None:
    async with WireSocket.open(server.ws_url) as ws:
        await RawHandshake(ws, DeviceKey.generate()).run()
        for _ in range(4):
            await ws.send_raw(fragmented(ping_of_size(300), FRAGMENT_CAP))
            await pong(ws)


# --- memory: a real daemon process ------------------------------------------------------------------------------------
def rss(pid: int) -> int:
    """Resident set size of a process in bytes (/proc/<pid>/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def processed(ws: WireSocket, payload: bytes, timeout: float) -> None:
    """Send a protocol ping and wait for its pong: the server has read everything sent before it."""
    with trio.fail_after(timeout):
        await roundtrip(ws, payload)


async def stream_fragments(ws: WireSocket, payload_bytes: int, fragment: bytes) -> None:
    """The start of a text message, then ``payload_bytes`` more in frames of ``fragment``; not finished."""
    await ws.send_raw(build_frame(TEXT, b'{"type":"ping","payload":{"pad":"', fin=False))
    batch = build_frame(CONTINUATION, fragment, fin=False) * (64 * KiB // len(fragment))
    per_batch = len(fragment) * (64 * KiB // len(fragment))
    for _ in range(payload_bytes // per_batch):
        await ws.send_raw(batch)


@pytest.mark.slow
async def test_fragmented_message_costs_about_its_size(tmp_path: Path) -> None:
    """1 MiB arriving as 2-byte fragments (half a million frames) raises the daemon's RSS by a small
    multiple of 1 MiB, not by tens of bytes per fragment."""
    payload = MiB
    env = {
        "PB_SERVER_DATA_DIR": str(tmp_path / "data"),
        "PB_WS_MAX_FRAGMENTS_PER_MESSAGE": str(10 * payload),
        "PB_LOG_LEVEL": "warning",
    }
    async with running("fragments", tmp_path, env) as server, WireSocket.open(server.ws_url) as ws:
        pid = server.proc.pid
        with trio.fail_after(30):
            await RawHandshake(ws, DeviceKey.generate()).run()
            # warm up: the same path once, with a small message
            await stream_fragments(ws, 256 * KiB, b"xx")
            await ws.send_frame(CONTINUATION, b'"}}')
            await pong(ws)
            await processed(ws, b"warm", 10)
            before = rss(pid)
        with trio.fail_after(90):
            await stream_fragments(ws, payload, b"xx")
            await processed(ws, b"sent", 80)
        grown = rss(pid) - before
        assert grown < 3 * payload + 4 * MiB, f"RSS grew by {grown / MiB:.1f} MiB for a {payload / MiB:.0f} MiB message"
        with trio.fail_after(30):  # and the message, once finished, is a normal message
            await ws.send_frame(CONTINUATION, b'"}}')
            reply = json.loads(await ws.get_message())
            assert reply["type"] == "pong"
