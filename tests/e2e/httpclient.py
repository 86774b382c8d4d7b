"""A tiny HTTP helper for the e2e tests: real requests (httpx under trio) and PB1 signed headers (§10.2).

    async with http_client(running) as http:
        r = await http.get("/health")
        r = await signed(http, key, device_id, "GET", "/api/devices")

The PB1 string is signed over the request target exactly as sent; ``signed`` sends exactly the target it
signed (httpx keeps an already-encoded ASCII path and query as they are).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from pocketbridge.client import DeviceKey, connect
from pocketbridge.protocol.auth import sign_pb1

ERROR_KEYS = {"error", "code", "request_id"}


@asynccontextmanager
async def http_client(running: Any, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An AsyncClient bound to the daemon's HTTP listener (no retries, short timeout)."""
    async with httpx.AsyncClient(base_url=running.http_url, timeout=10.0, **kw) as client:
        yield client


_last_ts = 0


def now_ms() -> int:
    """A fresh, strictly increasing millisecond timestamp (so identical requests never share a signature)."""
    global _last_ts
    ts = max(int(time.time() * 1000), _last_ts + 1)
    _last_ts = ts
    return ts


def body_bytes(body: Any) -> bytes:
    """A JSON body as compact bytes; bytes/str are used as they are; None is the empty body."""
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body, separators=(",", ":")).encode()


def pb1_headers(
    key: DeviceKey | bytes,
    device_id: str,
    method: str,
    target: str,
    body: bytes = b"",
    *,
    timestamp: int | str | None = None,
) -> dict[str, str]:
    """The three X-PB-* headers of a request, signed with ``key`` (a DeviceKey or its 32-byte seed)."""
    seed = key.seed if isinstance(key, DeviceKey) else key
    ts = str(now_ms() if timestamp is None else timestamp)
    return {
        "X-PB-Device-ID": device_id,
        "X-PB-Timestamp": ts,
        "X-PB-Signature": sign_pb1(seed, method, target, ts, device_id, body),
    }


async def signed(
    http: httpx.AsyncClient,
    key: DeviceKey | bytes,
    device_id: str,
    method: str,
    target: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    timestamp: int | str | None = None,
) -> httpx.Response:
    """Send a PB1 signed request; ``target`` is the path with its query, signed and sent verbatim."""
    raw = body_bytes(body)
    hdrs = pb1_headers(key, device_id, method, target, raw, timestamp=timestamp)
    if raw:
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    return await http.request(method, target, content=raw, headers=hdrs)


async def bearer(
    http: httpx.AsyncClient, token: str, method: str, target: str, body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    raw = body_bytes(body)
    hdrs = {"Authorization": f"Bearer {token}"}
    if raw:
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    return await http.request(method, target, content=raw, headers=hdrs)


def assert_error(response: httpx.Response, status: int, code: str, text: str | None = None) -> dict[str, Any]:
    """An error response of §10.1: exact status, exact key set, the code, the text (if given), the request id."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == ERROR_KEYS, body
    assert body["code"] == code, body
    if text is not None:
        assert body["error"] == text, body
    assert isinstance(body["error"], str) and body["error"]
    assert body["request_id"] == response.headers["X-Request-ID"], (body, response.headers)
    return body


async def register(running: Any, key: DeviceKey, device_id: str, **kw: Any) -> None:
    """Register a device over the WebSocket (handshake, then disconnect)."""
    async with connect(running.ws_url, key, device_id, **kw):
        pass


async def wait_for(predicate: Any, timeout: float = 2.0, interval: float = 0.02) -> None:
    """Poll an async predicate until it is true (bounded)."""
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)
