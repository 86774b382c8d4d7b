"""The send queue and the closing of a connection (gateway/connection.py), over in-memory streams.

The server side is the gateway's :class:`WebSocket` past the HTTP upgrade (its reader not running); the client
side is plain wsproto reading the bytes the server wrote. Nothing reads the server's socket here, so a close
handshake never completes: :meth:`Connection.finish` ends at ``close_timeout`` by aborting (the autojump
clock makes that instant). What matters is what was written before.
"""

from __future__ import annotations

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Ping, Request, TextMessage

from pocketbridge.errors import EXPECTED_AUTH, TRY_AGAIN
from pocketbridge.gateway.connection import Connection, Outbox
from pocketbridge.gateway.wsconn import WebSocket

CLOSE_TIMEOUT = 5.0


# --- Outbox -------------------------------------------------------------------------------------------------
def test_put_is_bounded_by_messages_and_by_size() -> None:
    box = Outbox(max_messages=3, max_bytes=10)
    assert box.put("aaaa") and box.put("bbbb")
    assert not box.put("ccc")  # 11 characters
    assert box.put("cc")
    assert not box.put("")  # a fourth message
    assert (len(box), box.size) == (3, 10)


def test_take_returns_batches_up_to_about_max_bytes_and_never_waits() -> None:
    box = Outbox(max_messages=10, max_bytes=100)
    assert box.take(10) == []
    for message in ("a" * 6, "b" * 6, "c" * 6, "d" * 30):
        box.put(message)
    assert box.take(10) == ["a" * 6, "b" * 6]  # at most one message past the limit
    assert (len(box), box.size) == (2, 36)
    assert box.take(1) == ["c" * 6]  # always at least one
    assert box.take(1000) == ["d" * 30]
    assert (len(box), box.size, bool(box)) == (0, 0, False)


async def test_a_message_stays_queued_until_the_reader_runs() -> None:
    """A waiting reader that has been woken but has not run yet holds nothing: whoever takes first gets it."""
    box = Outbox(max_messages=10, max_bytes=100)
    got: list[list[str]] = []

    async def reader() -> None:
        got.append(await box.get_many(100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        assert box.put("hello") and box.put("world")
        assert (len(box), box.size) == (2, 10)  # still queued, and counted, until taken
        assert box.take(100) == ["hello", "world"]
        assert box.size == 0
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # the reader found the queue empty again and waits
        box.put("later")
    assert got == [["later"]]


async def test_get_many_stops_at_a_cancel_even_with_messages_queued() -> None:
    box = Outbox(max_messages=10, max_bytes=100)
    box.put("queued")
    with trio.CancelScope() as scope:
        scope.cancel()
        await box.get_many(100)
    assert scope.cancelled_caught
    assert (len(box), box.size) == (1, 6)


# --- Connection.finish ------------------------------------------------------------------------------------------
async def upgraded(**queue: int) -> tuple[Connection, trio.abc.ReceiveStream, WSConnection]:
    """A gateway :class:`Connection` on a :class:`WebSocket` past the HTTP upgrade (its reader not running),
    the client's end of the stream and the client's wsproto connection."""
    server_stream, client_stream = trio.testing.memory_stream_pair()
    client = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(client.send(Request(host="test", target="/ws")))
    ws = WebSocket(server_stream, max_message_bytes=1 << 20, handshake_message_bytes=1 << 16, max_fragments=64)
    request = await ws.receive_request()
    assert request is not None and request.target == "/ws"
    await ws.accept()
    client.receive_data(bytes(await client_stream.receive_some(65536)))
    assert isinstance(next(client.events()), AcceptConnection)
    conn = Connection(
        ws, "test",
        send_queue_messages=queue.get("messages", 100),
        send_queue_bytes=queue.get("size", 1 << 20),
        close_timeout=CLOSE_TIMEOUT,
    )
    return conn, client_stream, client


async def received(stream: trio.abc.ReceiveStream, client: WSConnection) -> list[Event]:
    """Every event in what the server wrote, up to its close frame or the end of the stream."""
    events: list[Event] = []
    with trio.fail_after(CLOSE_TIMEOUT * 2):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return events
            client.receive_data(bytes(data))
            for event in client.events():
                events.append(event)
                if isinstance(event, CloseConnection):
                    return events


def summary(events: list[Event]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for event in events:
        if isinstance(event, TextMessage):
            out.append(("text", event.data))
        elif isinstance(event, Ping):
            out.append(("ping", bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("close", (event.code, event.reason)))
        else:
            out.append((type(event).__name__, None))
    return out


async def test_close_right_after_a_message_woke_the_writer(autojump_clock: trio.abc.Clock) -> None:
    """The writer was waiting, a reply is queued (waking it) and the connection is closed before the writer
    runs: the reply and then the close frame are written."""
    conn, client_stream, client = await upgraded()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run_writer)
        await trio.testing.wait_all_tasks_blocked()
        conn.send('{"type":"server_hello"}')
        conn.close(EXPECTED_AUTH)
        await conn.finish()
    assert summary(await received(client_stream, client)) == [
        ("text", '{"type":"server_hello"}'),
        ("close", (EXPECTED_AUTH.code, EXPECTED_AUTH.reason)),
    ]


async def test_close_flushes_the_queue_then_final_message_then_close_frame(autojump_clock: trio.abc.Clock) -> None:
    """Queued messages (a protocol ping as a ping frame) go out before the final message and the close frame."""
    conn, client_stream, client = await upgraded()
    conn.send('{"n":1}')
    conn.send_ping()
    conn.send('{"n":2}')
    conn.close(EXPECTED_AUTH, '{"type":"device_revoked"}')
    conn.send('{"n":3}')  # after the close: dropped
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run_writer)
        await conn.finish()
    assert summary(await received(client_stream, client)) == [
        ("text", '{"n":1}'),
        ("ping", b"pb"),
        ("text", '{"n":2}'),
        ("text", '{"type":"device_revoked"}'),
        ("close", (EXPECTED_AUTH.code, EXPECTED_AUTH.reason)),
    ]


async def test_overflow_skips_the_queue_but_sends_the_close_frame(autojump_clock: trio.abc.Clock) -> None:
    conn, client_stream, client = await upgraded(messages=2)
    for n in range(3):  # the third does not fit: closed with 1013
        conn.send(f'{{"n":{n}}}')
    assert (conn.overflowed, conn.close_reason) == (True, TRY_AGAIN)
    await conn.finish()
    assert summary(await received(client_stream, client)) == [("close", (TRY_AGAIN.code, TRY_AGAIN.reason))]
