"""Idle TCP sockets cannot exhaust the WebSocket listener (protocol.md §9): a connection counts against its
address from accept, the HTTP upgrade has a short timeout of its own, an unauthenticated connection lives at
most one handshake_timeout in all, and the connections not yet past the handshake are capped (the oldest is
shed), so real clients and /health/live keep being served."""

from __future__ import annotations

import contextlib
import urllib.parse
from pathlib import Path

import httpx
import trio

from pocketbridge.client import DeviceKey, connect, new_device_id
from tests.conftest import make_config, run_daemon

HIGH = {"ws_connects_per_ip_per_minute": 10_000, "handshakes_per_ip_per_minute": 10_000}


async def open_silent(url: str) -> trio.SocketStream:
    parsed = urllib.parse.urlsplit(url)
    return await trio.open_tcp_stream(parsed.hostname or "127.0.0.1", parsed.port or 80)


async def read_until(stream: trio.SocketStream, marker: bytes, seconds: float) -> bytes | None:
    """What the server sent up to and including ``marker``, or None if it did not come within ``seconds``."""
    received = b""
    with trio.move_on_after(seconds):
        while marker not in received:
            data = await stream.receive_some(4096)
            if not data:
                return None
            received += data
        return received
    return None


async def closed_within(stream: trio.SocketStream, seconds: float) -> bytes | None:
    """What the server sent before closing, or None if it is still open after ``seconds``."""
    received = b""
    with trio.move_on_after(seconds):
        while True:
            try:
                data = await stream.receive_some(4096)
            except trio.BrokenResourceError:
                return received
            if not data:
                return received
            received += data
    return None


async def test_silent_sockets_beyond_the_per_address_limit_are_closed_at_once(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", limits={**HIGH, "ws_connections_per_ip": 5})
    async with run_daemon(config) as (_, running), contextlib.AsyncExitStack() as stack:
        with trio.fail_after(30):
            kept = [await open_silent(running.ws_url) for _ in range(5)]
            for s in kept:
                stack.push_async_callback(s.aclose)
            await trio.sleep(0.2)
            for _ in range(5):
                extra = await open_silent(running.ws_url)
                stack.push_async_callback(extra.aclose)
                answer = await closed_within(extra, 2)
                assert answer is not None and answer.startswith(b"HTTP/1.1 429"), answer
            for s in kept:  # the first five are still waiting for their upgrade
                assert await closed_within(s, 0.05) is None


async def test_upgrade_has_its_own_short_timeout_and_the_whole_handshake_one_deadline(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", limits=HIGH, ws={"upgrade_timeout": 1, "handshake_timeout": 2.5})
    async with run_daemon(config) as (_, running):
        with trio.fail_after(30):
            silent = await open_silent(running.ws_url)
            started = trio.current_time()
            assert await closed_within(silent, 5) is not None
            assert trio.current_time() - started < 2.0, "a silent socket outlived [ws] upgrade_timeout"
            await silent.aclose()

            # upgrade at the last moment, then stay silent: closed at handshake_timeout counted from accept
            parsed = urllib.parse.urlsplit(running.ws_url)
            slow = await open_silent(running.ws_url)
            started = trio.current_time()
            await trio.sleep(0.9)
            await slow.send_all(
                f"GET /ws HTTP/1.1\r\nHost: {parsed.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            answer = await read_until(slow, b"Handshake timeout", 6)
            took = trio.current_time() - started
            assert answer is not None and answer.startswith(b"HTTP/1.1 101"), answer
            assert b"Handshake timeout" in answer
            assert took < 2.5 + 0.6, f"an unauthenticated connection lived {took:.1f} s (limit 2.5 s from accept)"
            await slow.aclose()


async def test_pending_cap_sheds_the_oldest_and_real_clients_get_through(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", limits={**HIGH, "ws_connections_per_ip": 10_000},
                         ws={"max_pending_connections": 20})
    async with run_daemon(config) as (_, running), contextlib.AsyncExitStack() as stack:
        with trio.fail_after(30):
            silent = []
            for _ in range(60):
                s = await open_silent(running.ws_url)
                stack.push_async_callback(s.aclose)
                silent.append(s)
            await trio.sleep(0.3)
            async with connect(running.ws_url, DeviceKey.generate(), new_device_id()) as client:
                assert (await client.send_event("notes:x", "note:text", b"through")).status == "stored"
            async with httpx.AsyncClient(timeout=5) as http:
                assert (await http.get(f"{running.http_url}/health/live")).status_code == 200
                metrics = (await http.get(f"{running.http_url}/metrics")).text
            closed = [await closed_within(s, 0.2) is not None for s in silent]
            assert all(closed[:40]), "the oldest silent sockets were not shed"
            assert sum(closed[40:]) <= 1, closed  # the newest stay (one slot went to the real client)
            assert 'pocketbridge_rate_limited_total{limit="max_pending_connections"}' in metrics
