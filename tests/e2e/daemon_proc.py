"""A fake systemd service manager for tests that run ``python -m pocketbridge serve`` as a real process.

The processes themselves are started, waited for and stopped with :mod:`pocketbridge.bench.launcher` (the one
launcher of the tests and the benchmark: spawn, banner, SIGTERM then SIGKILL, output tails). This module adds
:class:`NotifySocket`, a ``$NOTIFY_SOCKET`` (unix datagram) recording every sd_notify message, with the listening
sockets of the process at ``READY=1``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Callable

import attrs
import trio

from pocketbridge.bench.launcher import listening_sockets


@attrs.define
class Notice:
    at: float  # trio.current_time() when received
    state: str  # e.g. "READY=1"
    listening: frozenset[tuple[str, int]] = frozenset()  # the sender's listening sockets at READY=1


class NotifySocket:
    """A fake service manager: a unix datagram socket at a short path (sun_path is limited to 108 bytes).

        async with NotifySocket.open() as notify:
            env["NOTIFY_SOCKET"] = notify.path
            server = spawn("name", workdir, env)  # pocketbridge.bench.launcher
            notify.pid_of = lambda: server.proc.pid
            ...
            notify.states()  # ["READY=1", "STATUS=0 connections", "WATCHDOG=1", ...]

    When ``READY=1`` arrives, the listening TCP sockets of ``pid_of()`` are read from /proc at once and kept
    on the notice, so a test can check that the listeners were bound before readiness was announced.
    """

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self.sock = sock
        self.path = path
        self.notices: list[Notice] = []
        self.pid_of: Callable[[], int | None] = lambda: None
        self.changed = trio.Event()

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls) -> AsyncIterator[NotifySocket]:
        directory = tempfile.mkdtemp(prefix="pbn-", dir="/tmp")
        path = os.path.join(directory, "notify")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            await sock.bind(path)
            self = cls(sock, path)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive)
                try:
                    yield self
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.rmdir(directory)

    async def _receive(self) -> None:
        while True:
            data = await self.sock.recv(65536)
            now = trio.current_time()
            for state in data.decode("utf-8", "replace").splitlines():
                listening: frozenset[tuple[str, int]] = frozenset()
                if state == "READY=1":
                    pid = self.pid_of()
                    listening = listening_sockets(pid) if pid else frozenset()
                self.notices.append(Notice(now, state, listening))
            self.changed.set()
            self.changed = trio.Event()

    def states(self) -> list[str]:
        return [n.state for n in self.notices]

    def times(self, state: str) -> list[float]:
        return [n.at for n in self.notices if n.state == state]

    async def wait_for(self, state: str, timeout: float = 10.0) -> Notice:  # noqa: ASYNC109 (bounded by default)
        with trio.fail_after(timeout):
            while True:
                for notice in self.notices:
                    if notice.state == state:
                        return notice
                await self.changed.wait()
