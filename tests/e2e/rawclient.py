"""Raw-socket helpers for the end-to-end tests (not a test module).

* :class:`RawHandshake` (hand-made ``client_hello``/``client_auth``, every field replaceable), :class:`WireSocket`
  (a wsproto client that can also write hand-made frames, see :func:`build_frame`) and :func:`send`,
  :func:`recv_json`, :func:`expect_close` come from :mod:`pocketbridge.bench.wire`, shared with the benchmark.
* :func:`assert_close` and :func:`assert_pong` check the server's answer; :func:`established` is a raw
  connection after a successful hand-made handshake; :func:`event_body` / :func:`send_valid_event` build events.
* :func:`assert_relay_works` checks that the daemon still handshakes and relays for a fresh user.
* :func:`assert_no_tracebacks` checks captured log records: client mistakes never log a traceback.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from pocketbridge.bench.wire import (
    DROP,
    TIMEOUT,
    RawHandshake,
    Socket,
    UpgradeRejected,
    WireSocket,
    apply_overrides,
    build_frame,
    dumps,
    expect_close,
    handshake_message,
    new_ephemeral_pub,
    recv_json,
    send,
)
from pocketbridge.client import DeviceKey, connect, new_device_id, new_event_id
from pocketbridge.config import Config

__all__ = [
    "DROP", "GENEROUS_LIMITS", "TIMEOUT", "RawHandshake", "Socket", "UpgradeRejected", "WireSocket",
    "assert_close", "assert_no_tracebacks", "assert_pong", "assert_relay_works", "build_frame", "dumps",
    "e2e_config", "each_case", "established", "event_body", "expect_close", "handshake_message",
    "new_ephemeral_pub", "open_ws", "recv_json", "send", "send_valid_event",
]

# Limits that the per-address rate limits (§9) would otherwise hit: many tests open many connections
# from 127.0.0.1 within a minute.
GENEROUS_LIMITS = {
    "ws_connections_per_ip": 10_000,
    "ws_connects_per_ip_per_minute": 100_000,
    "handshakes_per_ip_per_minute": 100_000,
}


def e2e_config(factory: Callable[..., Config], **sections: dict[str, Any]) -> Config:
    """``config_factory`` with generous per-address limits and a faster (still durable) SQLite mode."""
    merged: dict[str, dict[str, Any]] = {"limits": dict(GENEROUS_LIMITS), "storage": {"sqlite_synchronous": "normal"}}
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    return factory(**merged)


async def each_case(cases: Mapping[str, Any], check: Callable[[str, Any], Awaitable[None]]) -> None:
    """Run ``check(name, value)`` for every case, one after the other; fail listing every failed case."""
    failures = []
    for name, value in cases.items():
        try:
            await check(name, value)
        except Exception as exc:  # noqa: BLE001 - reported below, with the case name
            failures.append(f"{name}: {_describe(exc)}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])
    return f"{type(exc).__name__}: {exc}"


# --- sockets and answers ------------------------------------------------------------------------------
@asynccontextmanager
async def open_ws(url: str, *, max_message_size: int = 64 * 1024 * 1024) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client connection with bounded connect/disconnect waits."""
    async with open_websocket_url(
        url, max_message_size=max_message_size, connect_timeout=TIMEOUT, disconnect_timeout=TIMEOUT
    ) as ws:
        yield ws


async def assert_close(
    ws: Socket, code: int, reason: str | None, timeout: float = TIMEOUT  # noqa: ASYNC109 (bounded by default)
) -> None:
    assert await expect_close(ws, timeout) == (code, reason)


async def assert_pong(ws: Socket, *, binary: bool = False) -> None:
    """An app ping gets a pong as the very next message (nothing else in between)."""
    await send(ws, {"type": "ping", "payload": {"timestamp": 1}}, binary=binary)
    msg = await recv_json(ws)
    assert msg["type"] == "pong", msg
    assert isinstance(msg["payload"]["timestamp"], int)


@asynccontextmanager
async def established(url: str, key: DeviceKey | None = None, device_id: str | None = None,
                      **auth_kw: Any) -> AsyncIterator[tuple[WebSocketConnection, RawHandshake]]:
    """A raw trio-websocket connection after a successful hand-made handshake."""
    async with open_ws(url) as ws:
        hs = RawHandshake(ws, key or DeviceKey.generate(), device_id)
        await hs.run(**auth_kw)
        yield ws, hs


# --- events ----------------------------------------------------------------------------------------------
def event_body(user_id: str | None, device_id: str, device_seq: Any, /, **overrides: Any) -> dict[str, Any]:
    """A valid ``event`` payload (§5.1), with fields replaced or dropped (``DROP``)."""
    body: dict[str, Any] = {
        "event_id": new_event_id(),
        "user_id": user_id,
        "device_id": device_id,
        "device_seq": device_seq,
        "stream_id": "clipboard:main",
        "type": "clipboard:text",
        "encrypted_payload": base64.b64encode(b"ciphertext").decode(),
    }
    if user_id is None:
        del body["user_id"]
    return apply_overrides(body, overrides)


async def send_event(ws: Socket, hs: RawHandshake, device_seq: Any) -> dict[str, Any]:
    """Send an event of the handshaken device (valid unless ``device_seq`` is not); returns its body."""
    body = event_body(hs.key.public_hex, hs.device_id, device_seq)
    await send(ws, {"type": "event", "payload": body})
    return body


async def send_valid_event(ws: Socket, hs: RawHandshake, device_seq: int) -> None:
    """Send a valid event and check that the very next message is its ``stored`` ack."""
    body = await send_event(ws, hs, device_seq)
    msg = await recv_json(ws)
    assert msg == {
        "type": "ack",
        "payload": {"device_seq": device_seq, "event_id": body["event_id"], "status": "stored"},
    }, msg


# --- daemon health and logs --------------------------------------------------------------------------------
async def assert_relay_works(url: str) -> None:
    """A fresh user's two devices still handshake, and an event from one reaches the other."""
    key = DeviceKey.generate()
    with trio.fail_after(TIMEOUT):
        async with (
            connect(url, key, new_device_id(), handshake_timeout=TIMEOUT) as receiver,
            connect(url, key, new_device_id(), handshake_timeout=TIMEOUT) as sender,
        ):
            ack = await sender.send_event("health:check", "health:ping", b"still alive")
            assert ack.status == "stored", ack
            event = await receiver.receive_event()
            assert event.payload == b"still alive"
            assert event.device_id == sender.device_id


def assert_no_tracebacks(records: Iterable[logging.LogRecord]) -> None:
    """Client mistakes never log at ERROR or with a traceback."""
    bad = [r for r in records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, "\n".join(f"{r.levelname} {r.name}: {r.getMessage()} exc_info={bool(r.exc_info)}" for r in bad)
