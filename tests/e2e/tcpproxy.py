"""A small TCP proxy the test controls, for simulating an unreachable dependency (trio).

    async with open_tcp_proxy("127.0.0.1", 5432) as proxy:
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/db"
        ...
        proxy.cut()      # every piped connection is closed at once; new ones are refused
        proxy.restore()  # new connections are accepted (and piped) again

It listens on 127.0.0.1 on an ephemeral port. While cut, new connections are accepted and reset at once
(SO_LINGER 0), so clients fail fast instead of hanging. Piped connections are closed abortively (reset)
as well. Everything the proxy started is stopped when the context exits.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

BUFFER = 65536


def _reset_on_close(stream: trio.SocketStream) -> None:
    """Make close() send RST instead of FIN (an abrupt loss of the peer)."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepting = True
        self.accepted = 0  # connections piped since the start
        self.refused = 0  # connections reset while cut
        self._scopes: set[trio.CancelScope] = set()

    @property
    def active(self) -> int:
        """Connections currently piped."""
        return len(self._scopes)

    def cut(self) -> None:
        """Close every piped connection and refuse new ones until :meth:`restore`."""
        self.accepting = False
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.accepting = True

    async def _serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        _reset_on_close(client)
        if not self.accepting:
            self.refused += 1
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                try:
                    upstream = await trio.open_tcp_stream(*self.target)
                except OSError:
                    return
                _reset_on_close(upstream)
                self.accepted += 1
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
            finally:
                self._scopes.discard(scope)
        with trio.CancelScope(shield=True):
            await client.aclose()

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(BUFFER):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            both.cancel()  # one side ended: end the pair


@asynccontextmanager
async def open_tcp_proxy(target_host: str, target_port: int) -> AsyncIterator[TcpProxy]:
    """Run a proxy to ``target_host:target_port`` for the duration of the block."""
    proxy = TcpProxy(target_host, target_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy._serve)
        try:
            yield proxy
        finally:
            proxy.cut()
            nursery.cancel_scope.cancel()
