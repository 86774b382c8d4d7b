"""Hostile input on the HTTP listener (protocol.md §10.1, §9) and deeply nested JSON on the WebSocket (§1.3).

* Deeply nested JSON is invalid input: 400 ``INVALID_JSON`` on REST, close 1008 ``Invalid message format`` on the
  WebSocket; never a 500, never a traceback.
* A path with an empty segment (``//health``, ``/api//devices``) is an unknown route: 404 ``NOT_FOUND``, never a
  redirect (a redirect would be built from the request's ``Host`` header).
* ``/metrics`` on the HTTP listener answers loopback peers only; behind a trusted proxy the forwarded address
  decides, and a forwarded value that is not a loopback address (or not an address at all) is refused.
* Cleartext HTTP/2 (prior knowledge or an ``Upgrade: h2c``; hypercorn has no public switch to turn it off) is
  bounded like HTTP/1.1, and an HTTP/2 error that ends hypercorn's server restarts the listener instead of
  stopping the daemon.

Every request goes over a real socket to an in-process daemon (SQLite; nothing here depends on the backend).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import h11
import pytest
import trio
from hyperframe.frame import HeadersFrame

from pocketbridge.app import Running
from pocketbridge.client import DeviceKey, connect, new_device_id
from pocketbridge.config import Config
from tests.conftest import make_config, run_daemon
from tests.e2e.httpclient import ERROR_KEYS, assert_error, http_client, register, signed
from tests.e2e.rawclient import (
    GENEROUS_LIMITS,
    TIMEOUT,
    assert_close,
    assert_no_tracebacks,
    each_case,
    established,
    open_ws,
    send,
)

ADMIN_KEY = "a" * 40
NESTED = "[" * 50_000  # far deeper than Python's recursion limit; not even closed: the depth stops the parser first
NESTED_CLOSED = "[" * 20_000 + "]" * 20_000  # well-formed, only too deep (and within the 64 KiB body limit)
INVALID_FORMAT = (1008, "Invalid message format")
HEAD_LIMIT = 16 * 1024  # the HTTP/1.1 request-head limit of the listener
H2_HEADER_LIMIT = 64 * 1024  # the HTTP/2 header-list limit (what the h2 library enforces)


@pytest.fixture(autouse=True)
def _no_tracebacks(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.INFO)
    yield
    assert_no_tracebacks(caplog.get_records("setup") + caplog.get_records("call"))


def config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    merged: dict[str, dict[str, Any]] = {"limits": dict(GENEROUS_LIMITS)}
    for name, values in sections.items():
        merged[name] = {**merged.get(name, {}), **values}
    return make_config(tmp_path / "data", **merged)


def http_port(running: Running) -> int:
    return int(running.http_url.rsplit(":", 1)[1])


@asynccontextmanager
async def tcp(running: Running) -> AsyncIterator[trio.SocketStream]:
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", http_port(running))
    async with stream:
        yield stream


async def http11(running: Running, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                 body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with the target sent byte for byte (httpx would read ``//health`` as a host)."""
    conn = h11.Connection(h11.CLIENT)
    head = headers if headers is not None else [("Host", "127.0.0.1")]
    async with tcp(running) as stream:
        request = h11.Request(method=method, target=target,
                              headers=[*head, ("Content-Length", str(len(body))), ("Connection", "close")])
        await stream.send_all(conn.send(request) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        response: h11.Response | None = None
        chunks = []
        with trio.fail_after(TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    assert response is not None
    return response.status_code, {k.decode().lower(): v.decode() for k, v in response.headers}, b"".join(chunks)


async def read_head(stream: trio.SocketStream) -> bytes:
    """Bytes up to the end of the first response head, or whatever came before the server closed."""
    data = b""
    with trio.fail_after(TIMEOUT):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return data


# --- deeply nested JSON -------------------------------------------------------------------------------
async def test_deeply_nested_json_in_a_rest_body_is_invalid_json(tmp_path: Path) -> None:
    key, device_id = DeviceKey.generate(), new_device_id()
    async with run_daemon(config(tmp_path, admin={"api_key": ADMIN_KEY})) as (_, running), \
            http_client(running) as http:
        await register(running, key, device_id)
        cases = {
            "profile, bare": ("/api/user/profile", NESTED),
            "profile, closed": ("/api/user/profile", NESTED_CLOSED),
            "profile, inside an object": ("/api/v1/user/profile", '{"preferences":' + NESTED_CLOSED + "}"),
            "rename": (f"/api/devices/{device_id}/rename", '{"device_name":' + NESTED_CLOSED + "}"),
        }

        async def check(name: str, case: tuple[str, str]) -> None:
            target, body = case
            with trio.fail_after(TIMEOUT):
                r = await signed(http, key, device_id, "POST", target, body)
            assert_error(r, 400, "INVALID_JSON")

        await each_case(cases, check)
        with trio.fail_after(TIMEOUT):
            r = await http.post("/admin/revoke-device", content=NESTED_CLOSED,
                                headers={"X-Admin-API-Key": ADMIN_KEY, "Content-Type": "application/json"})
            assert_error(r, 400, "INVALID_JSON")
            r = await signed(http, key, device_id, "GET", "/api/user/profile")  # the device still works
            assert r.status_code == 200, r.text


async def test_deeply_nested_json_on_the_websocket_closes_1008(tmp_path: Path) -> None:
    async with run_daemon(config(tmp_path)) as (_, running):
        messages = {
            "bare": NESTED,
            "closed": NESTED_CLOSED,
            "in the payload": '{"type":"ping","payload":' + NESTED_CLOSED + "}",
        }

        async def before_the_handshake(name: str, message: str) -> None:
            async with open_ws(running.ws_url) as ws:
                await send(ws, message)
                await assert_close(ws, *INVALID_FORMAT)

        async def established_session(name: str, message: str) -> None:
            async with established(running.ws_url) as (ws, _):
                await send(ws, message)
                await assert_close(ws, *INVALID_FORMAT)

        await each_case(messages, before_the_handshake)
        await each_case(messages, established_session)


# --- paths with an empty segment ------------------------------------------------------------------------
async def test_double_slash_paths_are_not_found_and_never_redirect(tmp_path: Path) -> None:
    async with run_daemon(config(tmp_path)) as (_, running):
        targets = {t: t for t in ("/api//devices", "//health", "//metrics", "/api/v1//devices", "//api/devices",
                                  "/health//live", "//admin/audit")}

        async def check(name: str, target: str) -> None:
            status, headers, body = await http11(running, "GET", target, [("Host", "evil.example")])
            assert status == 404, (status, headers, body[:200])
            assert "location" not in headers, headers
            assert headers["content-type"].startswith("application/json"), headers
            payload = json.loads(body)
            assert set(payload) == ERROR_KEYS and payload["code"] == "NOT_FOUND", payload

        await each_case(targets, check)
        # the real paths still answer
        assert (await http11(running, "GET", "/health/live"))[0] == 200
        assert (await http11(running, "GET", "/metrics"))[0] == 200


# --- /metrics: loopback peers only ----------------------------------------------------------------------
@pytest.mark.parametrize("ipv6_prefix", [64, 128])
async def test_metrics_loopback_rule_behind_a_trusted_proxy(tmp_path: Path, ipv6_prefix: int) -> None:
    cfg = config(tmp_path, server={"trusted_proxies": ["127.0.0.1"]}, limits={"ipv6_prefix": ipv6_prefix})
    async with run_daemon(cfg) as (_, running), http_client(running) as http:
        allowed = {"direct": None, "127.0.0.1": "127.0.0.1", "127.0.0.9:8080": "127.0.0.9:8080", "::1": "::1",
                   "[::1]:443": "[::1]:443", "::ffff:127.0.0.1": "::ffff:127.0.0.1"}
        refused = {x: x for x in ("::100", "::1:0:0:0:5", "garbage", "10.0.0.1", "203.0.113.9, 127.0.0.1",
                                  "127.0.0.1, garbage", "0.0.0.0", "::", "localhost", "127.0.0.1.example")}

        async def ok(name: str, forwarded: str | None) -> None:
            headers = {"X-Forwarded-For": forwarded} if forwarded is not None else {}
            with trio.fail_after(TIMEOUT):
                r = await http.get("/metrics", headers=headers)
            assert r.status_code == 200, (r.status_code, r.text[:200])

        async def not_found(name: str, forwarded: str) -> None:
            with trio.fail_after(TIMEOUT):
                r = await http.get("/metrics", headers={"X-Forwarded-For": forwarded})
            assert r.status_code == 404, (r.status_code, r.text[:200])
            assert_error(r, 404, "NOT_FOUND")

        await each_case(allowed, ok)
        await each_case(refused, not_found)


async def test_metrics_without_trusted_proxies_ignores_forwarded_for(tmp_path: Path) -> None:
    async with run_daemon(config(tmp_path)) as (_, running), http_client(running) as http:
        for forwarded in ("10.0.0.1", "garbage", "::100"):
            with trio.fail_after(TIMEOUT):
                r = await http.get("/metrics", headers={"X-Forwarded-For": forwarded})
            assert r.status_code == 200, (forwarded, r.status_code)


# --- cleartext HTTP/2 -----------------------------------------------------------------------------------
def h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn


async def h2_events(stream: trio.SocketStream, conn: h2.connection.H2Connection, until: Any,
                    timeout: float = TIMEOUT) -> list[h2.events.Event]:
    """Read and answer frames until ``until(events so far)`` holds or the server closes; bounded."""
    seen: list[h2.events.Event] = []
    with trio.fail_after(timeout):
        while not until(seen):
            data = await stream.receive_some(65536)
            if not data:
                break
            seen.extend(conn.receive_data(data))
            out = conn.data_to_send()
            if out:
                await stream.send_all(out)
    return seen


def server_settings(events: list[h2.events.Event]) -> dict[int, int]:
    for event in events:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            return {int(code): change.new_value for code, change in event.changed_settings.items()}
    raise AssertionError(f"no SETTINGS from the server: {events}")


def ended(stream_id: int) -> Any:
    return lambda events: any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                              and e.stream_id == stream_id for e in events)


def request_headers(path: str, method: str = "GET", **extra: str) -> list[tuple[str, str]]:
    return [(":method", method), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1"),
            *extra.items()]


def response_of(events: list[h2.events.Event], stream_id: int) -> tuple[int, bytes]:
    status, body = None, b""
    for event in events:
        if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
            status = int(dict(event.headers)[":status"])
        elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
            body += event.data
    assert status is not None, events
    return status, body


async def test_cleartext_http2_is_bounded_like_http11(tmp_path: Path) -> None:
    """One request at a time per connection and 64 KiB header lists, as the server's SETTINGS say (over the
    preface and after an h2c upgrade); the app's own checks answer over HTTP/2 as over HTTP/1.1."""
    async with run_daemon(config(tmp_path)) as (_, running):
        async with tcp(running) as stream:
            conn = h2_client()
            conn.send_headers(1, request_headers("/health/live"), end_stream=True)
            await stream.send_all(conn.data_to_send())
            events = await h2_events(stream, conn, ended(1))
            settings = server_settings(events)
            assert settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS) == 1, settings
            assert settings.get(h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE) == H2_HEADER_LIMIT, settings
            assert response_of(events, 1) == (200, b'{"status":"ok"}\n')

            # the app's own checks answer over HTTP/2 too (a request Content-Encoding: 415)
            conn.send_headers(3, request_headers("/health/live", **{"content-encoding": "gzip"}), end_stream=True)
            await stream.send_all(conn.data_to_send())
            events = await h2_events(stream, conn, ended(3))
            status, body = response_of(events, 3)
            assert status == 415, body

        # a second stream while one is open breaks the advertised limit: no answer to it
        async with tcp(running) as stream:
            conn = h2_client()
            await stream.send_all(conn.data_to_send())
            await h2_events(stream, conn, lambda seen: any(isinstance(e, h2.events.RemoteSettingsChanged)
                                                           for e in seen))
            conn.send_headers(1, request_headers("/health/live"), end_stream=False)
            # the client library keeps to the limit itself: write stream 3's HEADERS frame by hand
            block = conn.encoder.encode(request_headers("/health/live"))
            second = HeadersFrame(3, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
            await stream.send_all(conn.data_to_send() + second)
            events = await h2_events(stream, conn, lambda seen: any(
                isinstance(e, h2.events.ConnectionTerminated) or (isinstance(e, h2.events.StreamReset)
                                                                  and e.stream_id == 3) for e in seen))
            assert not any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == 3 for e in events), events

        # the h2c upgrade gets the same SETTINGS (sent after the 101)
        async with tcp(running) as stream:
            await stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings"
                                  b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
            head = await read_head(stream)
            if head.startswith(b"HTTP/1.1 101"):
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_upgrade_connection()
                await stream.send_all(conn.data_to_send())
                rest = head.split(b"\r\n\r\n", 1)[1]
                events = conn.receive_data(rest) if rest else []
                events += await h2_events(stream, conn, lambda seen: ended(1)(events + seen))
                settings = server_settings(events)
                assert settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS) == 1, settings
            else:
                assert head.startswith(b"HTTP/1.1 200"), head


async def test_request_heads_are_limited_on_http11_and_http2(tmp_path: Path) -> None:
    async with run_daemon(config(tmp_path)) as (_, running):
        with trio.fail_after(TIMEOUT):
            status, _, _ = await http11(running, "GET", "/health/live",
                                        [("Host", "127.0.0.1"), ("X-Big", "a" * (8 * HEAD_LIMIT))])
        assert 400 <= status < 500, status
        async with tcp(running) as stream:
            conn = h2_client()
            conn.send_headers(1, request_headers("/health/live", **{"x-big": "a" * H2_HEADER_LIMIT}), end_stream=True)
            await stream.send_all(conn.data_to_send())
            events = await h2_events(stream, conn, lambda seen: any(
                isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset, h2.events.ResponseReceived))
                for e in seen))
            assert not any(isinstance(e, h2.events.ResponseReceived) for e in events), events
        await _still_serving(running)


async def _still_serving(running: Running) -> None:
    """The daemon serves HTTP (a listener that an HTTP/2 error ended is back within moments)."""
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                status, _, body = await http11(running, "GET", "/health/live")
                break
            except OSError:
                await trio.sleep(0.05)
    assert (status, body) == (200, b'{"status":"ok"}\n')


async def _websocket_unaffected(running: Running) -> None:
    async with connect(running.ws_url, DeviceKey.generate(), new_device_id()) as client:
        assert (await client.send_event("notes:x", "note:text", b"still here")).status == "stored"


async def test_http2_data_after_the_response_does_not_stop_the_daemon(tmp_path: Path) -> None:
    async with run_daemon(config(tmp_path)) as (_, running):
        async with tcp(running) as stream:
            conn = h2_client()
            conn.send_headers(1, request_headers("/health/live"), end_stream=False)  # a body "follows"
            await stream.send_all(conn.data_to_send())
            await h2_events(stream, conn, ended(1))
            conn.send_data(1, b"x" * 100, end_stream=True)
            await stream.send_all(conn.data_to_send())
            with trio.move_on_after(1):
                await h2_events(stream, conn, lambda seen: False)
        await _still_serving(running)
        await _websocket_unaffected(running)
        await _websocket_unaffected(running)


async def test_http2_priority_flood_does_not_stop_the_daemon(tmp_path: Path) -> None:
    async with run_daemon(config(tmp_path)) as (_, running):
        async with tcp(running) as stream:
            conn = h2_client()
            for stream_id in range(1, 2200, 2):
                conn.prioritize(stream_id, weight=16)
            await stream.send_all(conn.data_to_send())
            with trio.move_on_after(1):
                await h2_events(stream, conn, lambda seen: False)
        await _still_serving(running)
        await _websocket_unaffected(running)
