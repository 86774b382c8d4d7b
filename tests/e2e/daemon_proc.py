"""Async helpers for tests that drive ``python -m pocketbridge serve`` as a real process (not a test module).

Builds on :mod:`tests.e2e.procs` (its :class:`ServerProcess`: banner parsing, describe, stop/kill) and adds what
the operations tests need on top, usable from inside a trio test without blocking the event loop:

* :func:`spawn` with extra command-line arguments and an environment cleaned of ``PB_*`` *and* of systemd's
  variables (``NOTIFY_SOCKET``, ``WATCHDOG_*``), so only what the test passes reaches the daemon;
* :func:`running`: spawn, wait for the banner, yield; always stopped (SIGTERM, bounded wait, SIGKILL) after;
* :func:`wait_banner`, :func:`wait_exit`, :func:`wait_for_output` (bounded polls with ``trio.sleep``);
* :class:`NotifySocket`: a fake ``$NOTIFY_SOCKET`` (unix datagram) recording every sd_notify message;
* :func:`listening_sockets`: the TCP sockets a process is listening on, read from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path

import attrs
import trio

from tests.e2e.procs import BASE_ENV, REPO_ROOT, ProcessError, ServerProcess

START_TIMEOUT = 30.0
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM")


def clean_env(overrides: Mapping[str, str], *, base: Mapping[str, str] = BASE_ENV) -> dict[str, str]:
    """The test runner's environment without ``PB_*`` and systemd variables, plus ``base`` and ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PB_") and k not in SYSTEMD_VARS}
    env.update(base)
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(
    name: str,
    workdir: Path,
    env: Mapping[str, str],
    *,
    args: Sequence[str] = (),
    base: Mapping[str, str] = BASE_ENV,
) -> ServerProcess:
    """Start ``python -m pocketbridge serve *args``; stdout/stderr go to ``workdir/name.std{out,err}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pocketbridge", "serve", *args],
            cwd=REPO_ROOT, env=clean_env(env, base=base), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
        )
    return ServerProcess(name, proc, stdout_path, stderr_path)


async def wait_banner(server: ServerProcess, timeout: float = START_TIMEOUT) -> None:
    """Until the startup banner (both URLs and the server key) is on stdout; fails if the process exits."""
    with trio.move_on_after(timeout):
        while not server.poll_banner():
            if server.proc.poll() is not None:
                raise ProcessError(f"{server.name} exited before serving\n{server.describe()}")
            await trio.sleep(0.02)
        return
    raise ProcessError(f"{server.name}: no banner within {timeout} s\n{server.describe()}")


async def wait_exit(server: ServerProcess, timeout: float) -> int | None:
    """The exit status, or None if the process still runs after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while server.proc.poll() is None:
            await trio.sleep(0.01)
    return server.proc.poll()


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


async def wait_for_output(
    server: ServerProcess, pattern: str, *, start: int = 0, timeout: float = 5.0, stream: str = "stderr"
) -> re.Match[str]:
    """The first match of ``pattern`` in the process's stderr (or stdout) after character ``start``."""
    path = server.stderr_path if stream == "stderr" else server.stdout_path
    regex = re.compile(pattern)
    with trio.move_on_after(timeout):
        while True:
            match = regex.search(read_text(path), start)
            if match is not None:
                return match
            await trio.sleep(0.02)
    raise AssertionError(f"{pattern!r} not in {server.name}'s {stream} within {timeout} s\n{server.describe()}")


@contextlib.asynccontextmanager
async def running(
    name: str,
    workdir: Path,
    env: Mapping[str, str],
    *,
    args: Sequence[str] = (),
    base: Mapping[str, str] = BASE_ENV,
    timeout: float = START_TIMEOUT,
) -> AsyncIterator[ServerProcess]:
    """A started daemon process (banner parsed); stopped in any case when the block ends."""
    server = spawn(name, workdir, env, args=args, base=base)
    try:
        await wait_banner(server, timeout)
        yield server
    finally:
        try:
            server.stop()
        finally:
            if server.proc.poll() is None:
                server.kill()
            print(server.describe())


@attrs.define
class Notice:
    at: float  # trio.current_time() when received
    state: str  # e.g. "READY=1"
    listening: frozenset[tuple[str, int]] = frozenset()  # the sender's listening sockets at READY=1


class NotifySocket:
    """A fake service manager: a unix datagram socket at a short path (sun_path is limited to 108 bytes).

        async with NotifySocket.open(pid_of=lambda: server.proc.pid) as notify:
            env["NOTIFY_SOCKET"] = notify.path
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

    async def wait_for(self, state: str, timeout: float = 10.0) -> Notice:
        with trio.fail_after(timeout):
            while True:
                for notice in self.notices:
                    if notice.state == state:
                        return notice
                await self.changed.wait()


def _proc_net_listeners(path: str) -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of the LISTEN sockets in a /proc/net/tcp{,6} table."""
    found: dict[int, tuple[str, int]] = {}
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A = TCP_LISTEN
            continue
        address, port = fields[1].split(":")
        if len(address) == 8:  # IPv4, little-endian hex
            host = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
        else:
            host = address
        found[int(fields[9])] = (host, int(port, 16))
    return found


def listening_sockets(pid: int) -> frozenset[tuple[str, int]]:
    """The (address, port) pairs that process ``pid`` is listening on (TCP), from /proc."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    except OSError:
        return frozenset()
    table = {**_proc_net_listeners(f"/proc/{pid}/net/tcp"), **_proc_net_listeners(f"/proc/{pid}/net/tcp6")}
    return frozenset(addr for inode, addr in table.items() if inode in inodes)
