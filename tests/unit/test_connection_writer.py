"""The writer started on demand (gateway/connection.py): with the connection's nursery, a writer task runs only
while the outbox has messages, so an idle connection runs none; order, flushing and closing are those of the
writer that runs for the whole connection (tests/unit/test_outbox.py)."""

from __future__ import annotations

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from pocketbridge.errors import EXPECTED_AUTH
from pocketbridge.gateway.connection import Connection, Outbox
from pocketbridge.gateway.wsconn import WebSocket
from tests.unit.test_outbox import CLOSE_TIMEOUT, received, summary, upgraded


def tasks_in(nursery: trio.Nursery) -> int:
    return len(nursery.child_tasks)


def on_demand(conn: Connection, nursery: trio.Nursery) -> Connection:
    """The same connection, its writer started in ``nursery`` whenever there is something to send."""
    return Connection(
        conn.ws, conn.peer, send_queue_messages=100, send_queue_bytes=1 << 20, close_timeout=CLOSE_TIMEOUT,
        nursery=nursery,
    )


async def test_the_writer_runs_only_while_there_is_something_to_send(autojump_clock: trio.abc.Clock) -> None:
    plain, client_stream, client = await upgraded()
    async with trio.open_nursery() as nursery:
        conn = on_demand(plain, nursery)
        assert tasks_in(nursery) == 0
        conn.send('{"n":1}')
        conn.send_ping()
        conn.send('{"n":2}')
        assert tasks_in(nursery) == 1  # one writer for all three
        await trio.testing.wait_all_tasks_blocked()
        assert tasks_in(nursery) == 0 and len(conn.outbox) == 0
        conn.send('{"n":3}')  # the next message starts it again
        await trio.testing.wait_all_tasks_blocked()
        assert tasks_in(nursery) == 0
        conn.close(EXPECTED_AUTH)
        await conn.finish()
    assert summary(await received(client_stream, client)) == [
        ("text", '{"n":1}'),
        ("ping", b"pb"),
        ("text", '{"n":2}'),
        ("text", '{"n":3}'),
        ("close", (EXPECTED_AUTH.code, EXPECTED_AUTH.reason)),
    ]


async def test_close_before_the_started_writer_ran(autojump_clock: trio.abc.Clock) -> None:
    """A reply starts a writer and the connection is closed before it runs: the reply, then the final message
    and the close frame are written, and finish returns once the writer has."""
    plain, client_stream, client = await upgraded()
    async with trio.open_nursery() as nursery:
        conn = on_demand(plain, nursery)
        conn.send('{"type":"server_hello"}')
        conn.close(EXPECTED_AUTH, '{"type":"bye"}')
        await conn.finish()
        assert tasks_in(nursery) == 0
        conn.send('{"late":1}')  # after finish: nothing starts a writer
        assert tasks_in(nursery) == 0
    assert summary(await received(client_stream, client)) == [
        ("text", '{"type":"server_hello"}'),
        ("text", '{"type":"bye"}'),
        ("close", (EXPECTED_AUTH.code, EXPECTED_AUTH.reason)),
    ]


async def test_close_while_the_writer_waits_on_a_slow_peer(autojump_clock: trio.abc.Clock) -> None:
    """The writer is blocked in a write (the peer reads nothing): finish waits for it up to close_timeout, then
    aborts the TCP connection, which ends the writer too."""
    server_stream, client_stream = trio.testing.lockstep_stream_pair()  # a write waits for the reader
    client = WSConnection(ConnectionType.CLIENT)
    ws = WebSocket(server_stream, max_message_bytes=1 << 20, handshake_message_bytes=1 << 16, max_fragments=64)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client_stream.send_all, client.send(Request(host="test", target="/ws")))
        assert await ws.receive_request() is not None
        nursery.start_soon(ws.accept)
        client.receive_data(bytes(await client_stream.receive_some(65536)))
        assert isinstance(next(client.events()), AcceptConnection)
    async with trio.open_nursery() as nursery:
        conn = Connection(ws, "test", send_queue_messages=100, send_queue_bytes=1 << 20,
                          close_timeout=CLOSE_TIMEOUT, nursery=nursery)
        conn.send('{"n":1}')
        await trio.testing.wait_all_tasks_blocked()
        assert tasks_in(nursery) == 1  # blocked in its write
        conn.close(EXPECTED_AUTH)
        started = trio.current_time()
        await conn.finish()
        assert trio.current_time() - started >= CLOSE_TIMEOUT
        await trio.testing.wait_all_tasks_blocked()
        assert tasks_in(nursery) == 0


def test_an_empty_outbox_holds_no_buffer() -> None:
    box = Outbox(max_messages=10, max_bytes=100)
    assert box._queue is None and box._ready is None
    assert box.put("abc") and box.put("de")
    assert box.take(1) == ["abc"] and len(box) == 1 and box.size == 2
    assert box.take(100) == ["de"] and len(box) == 0 and box.size == 0
    assert box._queue is None  # the deque (a 64-slot block) goes when the queue is empty
    box = Outbox(max_messages=0, max_bytes=100)
    assert not box.put("a")  # the bounds hold for an outbox without a buffer too
