"""A tiny HTTP/1.1 client for the benchmark (one request per connection, bounded), and PB1-signed headers."""

from __future__ import annotations

import time

import trio

from ..client import DeviceKey
from ..protocol.auth import sign_pb1
from .params import BenchError

OP_TIMEOUT = 30.0


async def http_request(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    *,
    timeout: float = OP_TIMEOUT,  # noqa: ASYNC109 (every request is bounded, by default OP_TIMEOUT)
) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a connection of its own; (status, body). The connection is closed as soon as the
    response is complete (hypercorn leaves it to the client to close, even after ``Connection: close``)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", "Accept: */*"]
    if body or method not in ("GET", "HEAD"):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    buf = bytearray()
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(raw)
            while (response := _complete(bytes(buf))) is None:
                chunk = await stream.receive_some(1 << 16)
                if not chunk:
                    raise BenchError(f"{method} {target}: the connection closed after {len(buf)} bytes of response")
                buf += chunk
    return response


def _complete(data: bytes) -> tuple[int, bytes] | None:
    """(status, body) if ``data`` holds a whole HTTP/1.1 response (Content-Length or chunked), else None."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        return None
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        while True:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                return None
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                return status, bytes(out)
            if len(rest) < size + 2:
                return None
            out += rest[:size]
            rest = rest[size + 2 :]
    length = int(fields.get("content-length", "0"))
    return (status, rest[:length]) if len(rest) >= length else None


def pb1(key: DeviceKey, device_id: str, method: str, target: str, body: bytes = b"") -> dict[str, str]:
    """The X-PB-* headers of a request signed by ``device_id`` (§10.2)."""
    timestamp = str(time.time_ns() // 1_000_000)
    return {
        "X-PB-Device-ID": device_id,
        "X-PB-Timestamp": timestamp,
        "X-PB-Signature": sign_pb1(key.seed, method, target, timestamp, device_id, body),
    }
