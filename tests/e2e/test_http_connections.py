"""HTTP connections end (protocol.md §10.1): with ``Connection: close`` right after the response, and a
keep-alive connection after ``[http] keep_alive_timeout`` of idleness. A client that made a request and keeps
its socket open cannot hold a descriptor of the daemon for good."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import trio

from tests.conftest import make_config, run_daemon


async def request_then_wait_for_close(url: str, headers: bytes, wait: float) -> tuple[bytes, float | None]:
    parsed = urllib.parse.urlsplit(url)
    stream = await trio.open_tcp_stream(parsed.hostname or "127.0.0.1", parsed.port or 80)
    async with stream:
        await stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: pocketbridge\r\n" + headers + b"\r\n")
        started = trio.current_time()
        received = b""
        with trio.move_on_after(wait):
            while data := await stream.receive_some(4096):
                received += data
            return received, trio.current_time() - started
        return received, None


async def test_connection_close_and_keep_alive_timeout_end_the_connection(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", http={"keep_alive_timeout": 1})
    async with run_daemon(config) as (_, running):
        with trio.fail_after(30):
            answer, closed_after = await request_then_wait_for_close(running.http_url, b"Connection: close\r\n", 5)
            assert answer.startswith(b"HTTP/1.1 200") and closed_after is not None and closed_after < 1, closed_after
            answer, closed_after = await request_then_wait_for_close(running.http_url, b"", 6)
            assert answer.startswith(b"HTTP/1.1 200")
            assert closed_after is not None and closed_after < 3, "an idle keep-alive connection was never closed"
