"""Writing at once on a real socket (``WebSocket.write_now``, used by ``Connection.send``): with nothing queued
or being written, a message goes straight into the socket without a writer task; a frame the socket takes
only in part is finished by the writer before anything else, so the stream stays whole and in order."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request, TextMessage

from pocketbridge.errors import EXPECTED_AUTH
from pocketbridge.gateway.connection import Connection
from pocketbridge.gateway.wsconn import WebSocket
from tests.unit.test_outbox import CLOSE_TIMEOUT, received, summary


def whole(events: list[Event]) -> list[tuple[str, object]]:
    """``summary`` with each text message in one piece (wsproto hands a large one over in parts)."""
    out: list[tuple[str, object]] = []
    parts: list[str] = []
    for event in events:
        if isinstance(event, TextMessage):
            parts.append(event.data)
            if event.message_finished:
                out.append(("text", "".join(parts)))
                parts = []
        else:
            out.extend(summary([event]))
    return out


@asynccontextmanager
async def on_a_socket() -> AsyncIterator[tuple[Connection, trio.Nursery, trio.SocketStream, WSConnection]]:
    """A connection past the upgrade over a real socket pair with small buffers: its reader runs, its writer
    is started on demand in a nursery of its own (which runs nothing else)."""
    a, b = trio.socket.socketpair()
    for sock in (a, b):  # small buffers: a large frame fills them
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(client.send(Request(host="test", target="/ws")))
    ws = WebSocket(server_stream, max_message_bytes=1 << 20, handshake_message_bytes=1 << 16, max_fragments=64)
    assert await ws.receive_request() is not None
    await ws.accept()
    client.receive_data(bytes(await client_stream.receive_some(65536)))
    assert isinstance(next(client.events()), AcceptConnection)
    async with trio.open_nursery() as outer, trio.open_nursery() as writers:
        outer.start_soon(ws.run_reader)
        conn = Connection(
            ws, "test", send_queue_messages=100, send_queue_bytes=1 << 22, close_timeout=CLOSE_TIMEOUT,
            nursery=writers,
        )
        yield conn, writers, client_stream, client


async def finish_while_the_peer_reads(conn: Connection, stream: trio.SocketStream, client: WSConnection) -> list:
    """``conn.finish()`` while the peer reads everything up to the close frame and answers it."""
    events: list[Event] = []

    async def read() -> None:
        events.extend(await received(stream, client))
        if events and isinstance(events[-1], CloseConnection):
            await stream.send_all(client.send(events[-1].response()))

    with trio.fail_after(10):
        async with trio.open_nursery() as reading:
            reading.start_soon(read)
            await conn.finish()
    return whole(events)


async def test_a_message_goes_straight_into_the_socket() -> None:
    async with on_a_socket() as (conn, writers, client_stream, client):
        conn.send('{"n":1}')
        conn.send_ping()
        conn.send('{"n":2}')
        assert len(writers.child_tasks) == 0 and len(conn.outbox) == 0  # no writer task, nothing queued
        conn.close(EXPECTED_AUTH)
        events = await finish_while_the_peer_reads(conn, client_stream, client)
    assert events == [
        ("text", '{"n":1}'),
        ("ping", b"pb"),
        ("text", '{"n":2}'),
        ("close", (EXPECTED_AUTH.code, EXPECTED_AUTH.reason)),
    ]


async def test_a_frame_taken_in_part_is_finished_first_and_the_rest_queues_behind_it() -> None:
    big = '{"big":"' + "x" * 300_000 + '"}'  # far more than the socket pair's buffers hold
    async with on_a_socket() as (conn, writers, client_stream, client):
        conn.send('{"n":1}')
        conn.send(big)  # the socket takes its first part: the writer is started for the rest
        assert conn.ws.has_unsent and len(writers.child_tasks) == 1
        conn.send('{"n":2}')  # queued behind it, never written into the middle of the big frame
        conn.send_ping()
        assert len(conn.outbox) == 2
        conn.close(EXPECTED_AUTH, '{"type":"bye"}')
        events = await finish_while_the_peer_reads(conn, client_stream, client)
    assert events == [
        ("text", '{"n":1}'),
        ("text", big),
        ("text", '{"n":2}'),
        ("ping", b"pb"),
        ("text", '{"type":"bye"}'),
        ("close", (EXPECTED_AUTH.code, EXPECTED_AUTH.reason)),
    ]


async def test_another_write_sends_the_rest_of_the_frame_first() -> None:
    """Before the writer started for it runs, another write (here a ping through ``send_many``, as the reader's
    pong or a close frame would be) finishes the frame first; the writer then has nothing left to do."""
    big = '{"big":"' + "y" * 300_000 + '"}'
    async with on_a_socket() as (conn, writers, client_stream, client):
        conn.send(big)
        assert conn.ws.has_unsent
        events: list[Event] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as reading:

                async def read() -> None:
                    events.extend(await received(client_stream, client))

                reading.start_soon(read)
                await conn.ws.send_many([""])
                assert not conn.ws.has_unsent
                await trio.testing.wait_all_tasks_blocked()
                assert len(writers.child_tasks) == 0  # the writer found nothing to write and returned
                await conn.ws.abort()
    assert whole(events)[:2] == [("text", big), ("ping", b"pb")]


def test_write_now_declines_without_a_socket() -> None:
    a, _ = trio.testing.memory_stream_pair()
    ws = WebSocket(a, max_message_bytes=1 << 20, handshake_message_bytes=1 << 16, max_fragments=64)
    assert ws.write_now('{"n":1}') is False and not ws.has_unsent


async def test_a_cancelled_write_keeps_the_rest_of_its_frame_for_the_next_one() -> None:
    """A write that carries the rest of a frame is cancelled while the socket is full (the reader's pong, or its
    close frame, when the connection is shed): the rest stays to go first, so the close frame written next
    follows the whole frame and the peer sees the close code, not a cut frame."""
    big = '{"big":"' + "c" * 300_000 + '"}'
    async with on_a_socket() as (conn, writers, client_stream, client):
        ws = conn.ws
        assert ws.write_now(big) and ws.has_unsent
        with trio.move_on_after(0.2) as cancelled:  # nobody reads: the write waits, then is cancelled
            await ws.send_many([""])
        assert cancelled.cancelled_caught and ws.has_unsent
        conn.close(EXPECTED_AUTH)
        events = await finish_while_the_peer_reads(conn, client_stream, client)
    assert events[0] == ("text", big)
    assert events[-1] == ("close", (EXPECTED_AUTH.code, EXPECTED_AUTH.reason))


async def test_the_reader_ends_quietly_when_the_socket_is_closed_while_it_waits_for_the_slot() -> None:
    """Two messages in one read: the reader waits for the slot with the second; the connection is aborted
    meanwhile (a close that timed out): the reader returns, it does not wait on the closed socket."""
    a, b = trio.socket.socketpair()
    server_stream, client_stream = trio.SocketStream(a), trio.SocketStream(b)
    client = WSConnection(ConnectionType.CLIENT)
    ws = WebSocket(server_stream, max_message_bytes=1 << 20, handshake_message_bytes=1 << 20, max_fragments=10)
    await client_stream.send_all(client.send(Request(host="test", target="/ws")))
    assert await ws.receive_request() is not None
    await ws.accept()
    client.receive_data(bytes(await client_stream.receive_some(65536)))
    assert isinstance(next(client.events()), AcceptConnection)
    await client_stream.send_all(client.send(TextMessage(data="one")) + client.send(TextMessage(data="two")))
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.run_reader)
            await trio.testing.wait_all_tasks_blocked()  # "one" in the slot, the reader holds "two"
            await ws.abort()
    assert ws.closed is not None and ws.closed.code == 1006
