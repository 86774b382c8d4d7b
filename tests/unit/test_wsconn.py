"""The server-side WebSocket adapter (gateway/wsconn.py) over in-memory streams, with wsproto as the client.

No sockets: ``trio.testing.memory_stream_pair`` carries the bytes, the client side is a plain wsproto
connection (or hand-made frames), and timeouts run on the autojump clock.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as FrameConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from pocketbridge.gateway.wsconn import ConnectionClosed, WebSocket, text_frame

TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9
MAX_MESSAGE = 1000
HANDSHAKE_LIMIT = 100
MAX_FRAGMENTS = 4
TOO_BIG = (1009, "Message too big")


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """One masked client frame, made by hand (so it can be wrong)."""
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Peer:
    """The client: wsproto over the other end of the stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: deque[Event] = deque()
        self.partial: list[Any] = []  # a message arriving in pieces (reported whole)

    async def send(self, *events: Event) -> None:
        await self.stream.send_all(b"".join(self.ws.send(event) for event in events))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def next_event(self) -> Event | None:
        """The next event from the server; None when the server closed the TCP connection."""
        with trio.fail_after(5):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.ws.receive_data(bytes(data))
                for event in self.ws.events():
                    if isinstance(event, (TextMessage, BytesMessage)) and not event.message_finished:
                        self.partial.append(event.data)
                        continue
                    if isinstance(event, (TextMessage, BytesMessage)) and self.partial:
                        whole: Any = self.partial[0][:0].join([*self.partial, event.data])
                        self.partial.clear()
                        event = type(event)(data=whole)
                    self.pending.append(event)
        return self.pending.popleft()

    async def expect_close(self) -> tuple[int, str | None]:
        """The server's close frame (any message first fails)."""
        event = await self.next_event()
        assert isinstance(event, CloseConnection), event
        return event.code, event.reason

    async def expect_eof(self) -> None:
        with trio.fail_after(5):
            while data := await self.stream.receive_some(65536):
                assert not data, data


class CountingStream(trio.abc.Stream):
    """Wraps a stream; counts the writes and can cut each one into small pieces with a checkpoint between
    them (as a slow socket would), so a write that is not under the lock would interleave with another."""

    def __init__(self, inner: trio.abc.Stream, piece: int = 0) -> None:
        self.inner = inner
        self.piece = piece
        self.writes = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        if not self.piece:
            await self.inner.send_all(data)
            return
        view = memoryview(bytes(data))
        for start in range(0, len(view), self.piece):
            await self.inner.send_all(view[start:start + self.piece])
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()  # type: ignore[attr-defined]

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def new_socket(stream: trio.abc.Stream) -> WebSocket:
    return WebSocket(stream, max_message_bytes=MAX_MESSAGE, handshake_message_bytes=HANDSHAKE_LIMIT,
                     max_fragments=MAX_FRAGMENTS)


@asynccontextmanager
async def opened(*, piece: int = 0, reader: bool = True) -> AsyncIterator[tuple[WebSocket, Peer, CountingStream]]:
    """A WebSocket past the upgrade, its reader running (unless ``reader`` is false), and its peer."""
    server_stream, client_stream = trio.testing.memory_stream_pair()
    counting = CountingStream(server_stream, piece)
    ws = new_socket(counting)
    peer = Peer(client_stream)
    await peer.send(Request(host="test", target="/ws"))
    request = await ws.receive_request()
    assert request is not None
    await ws.accept()
    assert isinstance(await peer.next_event(), AcceptConnection)
    async with trio.open_nursery() as nursery:
        if reader:
            nursery.start_soon(ws.run_reader)
        yield ws, peer, counting
        nursery.cancel_scope.cancel()


# --- the HTTP upgrade --------------------------------------------------------------------------------------------
async def test_request_gives_path_and_headers_and_accept_opens() -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    ws, peer = new_socket(server_stream), Peer(client_stream)
    await peer.send(Request(host="test", target="/ws?v=1", extra_headers=[(b"X-Forwarded-For", b"203.0.113.9")]))
    request = await ws.receive_request()
    assert request is not None and request.target == "/ws?v=1"
    assert (b"x-forwarded-for", b"203.0.113.9") in [(k.lower(), v) for k, v in request.extra_headers]
    await ws.accept()
    assert isinstance(await peer.next_event(), AcceptConnection)


async def test_reject_answers_the_status_and_closes() -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    ws, peer = new_socket(server_stream), Peer(client_stream)
    await peer.send(Request(host="test", target="/other"))
    assert await ws.receive_request() is not None
    await ws.reject(404)
    event = await peer.next_event()
    assert isinstance(event, RejectConnection) and event.status_code == 404
    assert isinstance(await peer.next_event(), RejectData)
    await peer.expect_eof()


@pytest.mark.parametrize(
    "data", [b"GARBAGE\r\n\r\n", b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"], ids=["not-http", "no-upgrade"]
)
async def test_a_request_that_is_not_an_upgrade_gets_400(data: bytes) -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    ws = new_socket(server_stream)
    await client_stream.send_all(data)
    assert await ws.receive_request() is None
    answer = b""
    with trio.fail_after(5):
        while chunk := await client_stream.receive_some(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")


async def test_end_of_stream_before_a_request_is_none() -> None:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    ws = new_socket(server_stream)
    await client_stream.send_all(b"GET /ws HTTP/1.1\r\n")
    await client_stream.aclose()
    assert await ws.receive_request() is None


# --- messages ------------------------------------------------------------------------------------------------------
async def test_text_and_binary_messages_arrive_in_order() -> None:
    async with opened() as (ws, peer, _):
        await peer.send(TextMessage(data="h\u00e9llo"), BytesMessage(data=b"\x00\x01"),
                        TextMessage(data="one ", message_finished=False), TextMessage(data="two"))
        assert await ws.get_message() == "h\u00e9llo"
        assert await ws.get_message() == b"\x00\x01"
        assert await ws.get_message() == "one two"


async def test_the_size_limit_counts_utf8_bytes_and_is_smaller_before_the_handshake() -> None:
    async with opened() as (ws, peer, _):
        await peer.send(TextMessage(data="x" * HANDSHAKE_LIMIT))
        assert await ws.get_message() == "x" * HANDSHAKE_LIMIT
        await peer.send(TextMessage(data="\u00e9" * (HANDSHAKE_LIMIT // 2 + 1)))  # 51 characters, 102 bytes
        assert await peer.expect_close() == TOO_BIG
        with pytest.raises(ConnectionClosed) as exc:
            await ws.get_message()
        assert (exc.value.code, exc.value.reason) == TOO_BIG
        assert ws.closed is not None and ws.closed.code == 1009


async def test_after_handshake_done_the_message_limit_applies() -> None:
    async with opened() as (ws, peer, _):
        ws.handshake_done()
        await peer.send(BytesMessage(data=b"b" * MAX_MESSAGE))
        assert await ws.get_message() == b"b" * MAX_MESSAGE
        await peer.send(BytesMessage(data=b"b" * (MAX_MESSAGE + 1)))
        assert await peer.expect_close() == TOO_BIG


async def test_too_big_in_fragments_and_over_several_reads() -> None:
    async with opened() as (ws, peer, _):
        ws.handshake_done()
        data = frame(TEXT, b"y" * (MAX_MESSAGE + 1))
        for start in range(0, len(data), 100):  # one frame arriving in many reads
            await peer.send_raw(data[start:start + 100])
        assert await peer.expect_close() == TOO_BIG
    async with opened() as (ws, peer, _):
        await peer.send_raw(frame(TEXT, b"z" * 60, fin=False) + frame(CONTINUATION, b"z" * 60))
        assert await peer.expect_close() == TOO_BIG


async def test_fragments_are_assembled_and_capped_per_message() -> None:
    async with opened() as (ws, peer, _):
        utf8 = "\u00e9t\u00e9".encode()
        pieces = [frame(TEXT, utf8[:3], fin=False), frame(CONTINUATION, utf8[3:], fin=False),
                  frame(PING, b"mid"), frame(CONTINUATION, b"", fin=False), frame(CONTINUATION, b"!")]
        await peer.send_raw(b"".join(pieces))  # 4 fragments (the cap), a cut UTF-8 sequence, a ping between
        assert await peer.next_event() == Pong(payload=b"mid")
        assert await ws.get_message() == "\u00e9t\u00e9!"
        await peer.send_raw(frame(BINARY, b"a", fin=False) + frame(CONTINUATION, b"b", fin=False)
                            + frame(CONTINUATION, b"c", fin=False) + frame(CONTINUATION, b"d"))
        assert await ws.get_message() == b"abcd"  # the count starts again for each message
        await peer.send_raw(frame(TEXT, b"a", fin=False) + frame(CONTINUATION, b"", fin=False) * MAX_FRAGMENTS)
        assert await peer.expect_close() == TOO_BIG


@pytest.mark.parametrize(
    ("data", "close"),
    [
        (frame(TEXT, b'{"x":"\xff"}'), (1007, "Invalid UTF-8 in text frame")),
        (frame(CONTINUATION, b"{}"), (1002, "Protocol error")),
        (frame(TEXT, b"{}", rsv=0x40), (1002, "Protocol error")),
        (frame(0x3, b"{}"), (1002, "Protocol error")),
    ],
    ids=["invalid-utf8", "lone-continuation", "reserved-bit", "reserved-opcode"],
)
async def test_frame_errors_get_a_close_frame_with_a_fixed_reason_then_tcp_close(
    data: bytes, close: tuple[int, str]
) -> None:
    async with opened() as (ws, peer, _):
        await peer.send_raw(data)
        assert await peer.expect_close() == close
        await peer.expect_eof()
        with pytest.raises(ConnectionClosed) as exc:
            await ws.get_message()
        assert exc.value.code == close[0]
        assert ws.closed is not None and (ws.closed.code, ws.closed.reason) == close


# --- control frames --------------------------------------------------------------------------------------------
async def test_pings_are_answered_and_pongs_recorded(autojump_clock: trio.abc.Clock) -> None:
    async with opened() as (ws, peer, _):
        await peer.send(Ping(payload=b"hi"))
        assert await peer.next_event() == Pong(payload=b"hi")
        assert ws.last_pong == 0.0
        await trio.sleep(7)
        await peer.send(Pong(payload=b"pb"))
        await peer.send(Ping(payload=b"sync"))  # answered after the pong above was handled
        assert await peer.next_event() == Pong(payload=b"sync")
        assert ws.last_pong == trio.current_time()


async def test_control_frames_are_answered_while_a_message_waits_and_the_hand_off_is_bounded() -> None:
    """The application is busy (nobody calls get_message): a ping is still answered while one message waits;
    with a second complete message the reader stops reading until the first is taken."""
    async with opened() as (ws, peer, _):
        await peer.send(TextMessage(data="first"), Ping(payload=b"1"))
        assert await peer.next_event() == Pong(payload=b"1")
        await peer.send(TextMessage(data="second"), Ping(payload=b"2"))
        with trio.move_on_after(0.2):
            await peer.next_event()
            raise AssertionError("the reader went past a second message while the first was waiting")
        assert await ws.get_message() == "first"
        assert await peer.next_event() == Pong(payload=b"2")
        assert await ws.get_message() == "second"


async def test_the_peers_close_is_answered_while_the_application_is_busy() -> None:
    async with opened() as (ws, peer, _):
        await peer.send(TextMessage(data="pending"), CloseConnection(code=1000, reason="bye"))
        assert await peer.expect_close() == (1000, "bye")
        await peer.expect_eof()
        assert await ws.get_message() == "pending"  # received before the close: still delivered
        with pytest.raises(ConnectionClosed) as exc:
            await ws.get_message()
        assert (exc.value.code, exc.value.reason) == (1000, "bye")
        with pytest.raises(ConnectionClosed):
            await ws.send_many(["late"])


async def test_end_of_stream_without_close_is_1006() -> None:
    async with opened() as (ws, peer, _):
        await peer.stream.aclose()
        with pytest.raises(ConnectionClosed) as exc:
            await ws.get_message()
        assert exc.value.code == 1006


# --- sending and closing ---------------------------------------------------------------------------------------
async def test_send_many_is_one_write_with_the_ping_marker_as_a_ping_frame() -> None:
    async with opened() as (ws, peer, counting):
        before = counting.writes
        await ws.send_many(['{"n":1}', "", '{"n":2}'])
        assert counting.writes == before + 1
        assert [await peer.next_event() for _ in range(3)] == [
            TextMessage(data='{"n":1}'), Ping(payload=b"pb"), TextMessage(data='{"n":2}')]


async def test_frames_of_the_reader_and_a_writer_never_interleave() -> None:
    """A slow socket (each write cut in small pieces with checkpoints): pongs and messages stay whole."""
    async with opened(piece=7) as (ws, peer, _):
        big = "m" * 5000

        async def write() -> None:
            for _ in range(5):
                await ws.send_many([big, big])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            for n in range(5):
                await peer.send(Ping(payload=str(n).encode()))
            events: list[Event] = []
            while len(events) < 15:
                event = await peer.next_event()
                assert event is not None
                events.append(event)
        assert sorted(bytes(e.payload) for e in events if isinstance(e, Pong)) == [b"0", b"1", b"2", b"3", b"4"]
        assert [e.data for e in events if isinstance(e, TextMessage)] == [big] * 10


async def test_aclose_sends_the_close_frame_waits_for_the_answer_then_closes_tcp() -> None:
    async with opened() as (ws, peer, _):
        await peer.send(TextMessage(data="dropped"))  # not taken before the close: dropped
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.aclose, 1008, "Invalid message format")
            assert await peer.expect_close() == (1008, "Invalid message format")
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ConnectionClosed):
                await ws.send_many(["after the close frame"])
            await peer.send(CloseConnection(code=1008))
            await peer.expect_eof()
        with pytest.raises(ConnectionClosed) as exc:
            await ws.get_message()
        assert (exc.value.code, exc.value.reason) == (1008, "Invalid message format")


async def test_aclose_is_bounded_by_the_callers_timeout_and_still_closes_tcp(autojump_clock: trio.abc.Clock) -> None:
    async with opened() as (ws, peer, _):
        with trio.move_on_after(10) as scope:
            await ws.aclose(1001, "Server shutting down")  # the peer never answers
        assert scope.cancelled_caught
        assert await peer.expect_close() == (1001, "Server shutting down")
        await peer.expect_eof()


async def test_aclose_releases_a_reader_waiting_to_hand_over_a_message(autojump_clock: trio.abc.Clock) -> None:
    async with opened() as (ws, peer, _):
        await peer.send(TextMessage(data="1"), TextMessage(data="2"))  # the slot is full, the reader waits
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.aclose)
            assert await peer.expect_close() == (1000, "")
            await peer.send(CloseConnection(code=1000))
            await peer.expect_eof()
        assert trio.current_time() == 0  # no timeout was needed


async def test_abort_closes_tcp_without_a_close_frame() -> None:
    async with opened() as (ws, peer, _):
        await ws.abort()
        assert await peer.next_event() is None
        assert ws.closed is not None and ws.closed.code == 1006
        with pytest.raises(ConnectionClosed):
            await ws.get_message()
        with pytest.raises(ConnectionClosed):
            await ws.send_many(["x"])


async def test_a_write_to_a_broken_stream_is_connection_closed() -> None:
    async with opened() as (ws, peer, _):
        await peer.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ConnectionClosed) as exc:
            await ws.send_many(["x"])
        assert exc.value.code == 1006


@pytest.mark.parametrize("size", [1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("char", ["a", "\u00e9", "\U0001f600"])
def test_text_frames_are_the_bytes_wsproto_writes(size: int, char: str) -> None:
    text = (char * size)[: max(1, size // len(char.encode()))]
    assert text_frame(text) == FrameConnection(ConnectionType.SERVER).send(TextMessage(data=text))
