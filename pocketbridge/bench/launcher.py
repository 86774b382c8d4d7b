"""Start, watch and stop ``python -m pocketbridge serve`` processes: the one launcher of the benchmark and the tests.

    with serve_cluster([env1, env2], workdir) as (one, two):    # synchronous (module-scoped test fixtures)
        one.ws_url, two.http_url, one.server_key ...
    async with running("name", workdir, env) as server:        # trio, without blocking the event loop
        ...
    server = spawn("name", workdir, env); await wait_banner(server); ...; server.stop()

The configuration reaches the daemon only as ``PB_<SECTION>_<KEY>`` variables: the inherited environment is cleaned
of ``PB_*`` variables and of systemd's (``NOTIFY_SOCKET``, ``WATCHDOG_*`` ...), then ``base`` (:data:`BASE_ENV` unless
told otherwise) and the caller's variables are added. stdout (the startup banner) and stderr (the daemon's log) go
to ``<workdir>/<name>.stdout`` and ``.stderr``; the URLs and the server key are parsed from the banner within a
timeout. :meth:`ServerProcess.stop` sends SIGTERM, waits (bounded), then SIGKILLs and waits;
:meth:`ServerProcess.describe` gives the tail of both files, for diagnosis.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

START_TIMEOUT = 30.0  # seconds for a process to print its banner
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL
TAIL_LINES = 40
SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "JOURNAL_STREAM")

_WS_RE = re.compile(r"WebSocket URL:\s+(ws://\S+)")
_HTTP_RE = re.compile(r"HTTP API:\s+(http://\S+)")
_KEY_RE = re.compile(r"server public key:\s+([0-9a-f]{64})")
_KEYGEN_RE = re.compile(r"public key:\s+([0-9a-f]{64})")

# The default base of every process (overridable): loopback ephemeral ports, quick drain, per-address limits high
# enough for a test suite that connects everything from 127.0.0.1.
BASE_ENV = {
    "PB_LISTEN_WS": "127.0.0.1:0",
    "PB_LISTEN_HTTP": "127.0.0.1:0",
    "PB_DRAIN_WINDOW": "0.5",
    "PB_DRAIN_DEADLINE": "3",
    "PB_LIMITS_WS_CONNECTS_PER_IP_PER_MINUTE": "10000",
    "PB_LIMITS_HANDSHAKES_PER_IP_PER_MINUTE": "10000",
    "PB_LIMITS_WS_CONNECTIONS_PER_IP": "1000",
    "PB_HTTP_UNAUTHENTICATED_PER_IP_PER_MINUTE": "10000",
    "PB_LOG_LEVEL": "info",
}


class ProcessError(RuntimeError):
    """A daemon process (or a ``pocketbridge`` command) failed; the message carries its output."""


def clean_env(
    overrides: Mapping[str, str], *, base: Mapping[str, str] = BASE_ENV, inherit_pb: bool = False
) -> dict[str, str]:
    """This process's environment without systemd's variables and without ``PB_*`` (``inherit_pb``: without
    ``PB_CONFIG`` only), plus ``base`` and ``overrides``; Python unbuffered."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in SYSTEMD_VARS and (k != "PB_CONFIG" if inherit_pb else not k.startswith("PB_"))
    }
    env.update(base)
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_text(path: Path) -> str:
    """The file's text ("" if it cannot be read)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<unreadable>"
    return "\n".join(text.splitlines()[-lines:])


@attrs.define
class ServerProcess:
    """A ``pocketbridge serve`` process; the URLs and the key once :meth:`poll_banner` has found the banner."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    ws_url: str = ""
    http_url: str = ""
    server_key: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll_banner(self) -> bool:
        """Parse the banner from stdout; True once both URLs and the key are known."""
        text = read_text(self.stdout_path)
        ws, http, key = _WS_RE.search(text), _HTTP_RE.search(text), _KEY_RE.search(text)
        if ws and http and key:
            self.ws_url, self.http_url, self.server_key = ws.group(1), http.group(1), key.group(1)
            return True
        return False

    def describe(self, lines: int = TAIL_LINES) -> str:
        return (
            f"--- {self.name} (pid {self.proc.pid}, exit {self.proc.returncode}) stdout:\n"
            f"{tail(self.stdout_path, lines)}\n"
            f"--- {self.name} stderr ({self.stderr_path}):\n{tail(self.stderr_path, lines)}"
        )

    def log_summary(self, samples: int = 5) -> dict[str, Any]:
        """Warnings and errors the daemon logged so far (JSON lines, or text with the level as a word)."""
        counts = {"warning": 0, "error": 0}
        first: list[str] = []
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return {"warning": None, "error": None, "first": []}
        for line in text.splitlines():
            try:
                entry = json.loads(line)
                level, msg = str(entry.get("level", "")).lower(), str(entry.get("msg", ""))
            except (ValueError, AttributeError):
                words = line.lower().split()
                level = next((w for w in ("critical", "error", "warning") if w in words), "")
                msg = line
            if level == "critical":
                level = "error"
            if level in counts:
                counts[level] += 1
                if len(first) < samples:
                    first.append(f"{level}: {msg[:200]}")
        return {**counts, "first": first}

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL and wait. Returns the exit status. Safe to call twice."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)


def spawn(
    name: str,
    workdir: Path,
    env: Mapping[str, str],
    *,
    args: Sequence[str] = (),
    base: Mapping[str, str] = BASE_ENV,
    inherit_pb: bool = False,
    cwd: Path | None = None,
) -> ServerProcess:
    """Start ``python -m pocketbridge serve *args`` (in ``cwd``, default ``workdir``); stdout and stderr go to
    ``workdir/name.stdout`` and ``workdir/name.stderr``. The environment: see :func:`clean_env`."""
    workdir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pocketbridge", "serve", *args],
            cwd=cwd or workdir,
            env=clean_env(env, base=base, inherit_pb=inherit_pb),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    return ServerProcess(name, proc, stdout_path, stderr_path)


def stop_all(servers: Sequence[ServerProcess], *, show: bool = True) -> None:
    """Stop every process (each bounded; never leaving one behind); print their output tails if ``show``.
    The first error, if any, is raised once all are stopped."""
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.stop()
        except BaseException as exc:  # noqa: BLE001 (keep stopping the others; never leave a process behind)
            errors.append(exc)
            with contextlib.suppress(BaseException):
                server.kill()
        if show:
            print(server.describe())
    if errors:
        raise errors[0]


# --- synchronous waits ----------------------------------------------------------------------------------------
def wait_started(servers: Sequence[ServerProcess], timeout: float = START_TIMEOUT) -> None:
    """Until every banner is printed (polling); ProcessError if a process exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    waiting = list(servers)
    while waiting:
        for server in list(waiting):
            if server.poll_banner():
                waiting.remove(server)
            elif server.proc.poll() is not None:
                raise ProcessError(f"{server.name} exited before serving\n{server.describe()}")
        if waiting and time.monotonic() > deadline:
            raise ProcessError(f"no banner within {timeout} s\n" + "\n".join(s.describe() for s in waiting))
        if waiting:
            time.sleep(0.05)


@contextlib.contextmanager
def serve_cluster(
    envs: Sequence[Mapping[str, str]],
    workdir: Path,
    *,
    names: Sequence[str] | None = None,
    timeout: float = START_TIMEOUT,
    base: Mapping[str, str] = BASE_ENV,
) -> Iterator[list[ServerProcess]]:
    """Start one process per env (in parallel), wait for all banners, yield them; always stop them all (and print
    their output tails, so a failing test shows them)."""
    names = list(names) if names is not None else [f"instance{i}" for i in range(1, len(envs) + 1)]
    servers: list[ServerProcess] = []
    try:
        for name, env in zip(names, envs, strict=True):
            servers.append(spawn(name, workdir, env, base=base))
        wait_started(servers, timeout)
        yield servers
    finally:
        stop_all(servers)


@contextlib.contextmanager
def serve(
    env: Mapping[str, str], workdir: Path, *, name: str = "instance1", timeout: float = START_TIMEOUT
) -> Iterator[ServerProcess]:
    """One process (see :func:`serve_cluster`)."""
    with serve_cluster([env], workdir, names=[name], timeout=timeout) as (server,):
        yield server


# --- trio waits (bounded polls with trio.sleep) -----------------------------------------------------------------
async def wait_banner(server: ServerProcess, timeout: float = START_TIMEOUT) -> None:  # noqa: ASYNC109 (output shown)
    """Until the startup banner (both URLs and the server key) is on stdout; fails if the process exits."""
    with trio.move_on_after(timeout):
        while not server.poll_banner():
            if server.proc.poll() is not None:
                raise ProcessError(f"{server.name} exited before serving\n{server.describe()}")
            await trio.sleep(0.02)
        return
    raise ProcessError(f"{server.name}: no banner within {timeout} s\n{server.describe()}")


async def wait_exit(server: ServerProcess, timeout: float) -> int | None:  # noqa: ASYNC109 (None: still running)
    """The exit status, or None if the process still runs after ``timeout`` seconds."""
    with trio.move_on_after(timeout):
        while server.proc.poll() is None:  # noqa: ASYNC110 (a child process's exit sets no trio event)
            await trio.sleep(0.01)
    return server.proc.poll()


async def wait_for_output(
    server: ServerProcess,
    pattern: str,
    *,
    start: int = 0,
    timeout: float = 5.0,  # noqa: ASYNC109 (an AssertionError naming the pattern, for the tests)
    stream: str = "stderr",
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
    timeout: float = START_TIMEOUT,  # noqa: ASYNC109 (for the start only, not the block)
) -> AsyncIterator[ServerProcess]:
    """A started daemon process (banner parsed); stopped in any case when the block ends (output tails printed)."""
    server = spawn(name, workdir, env, args=args, base=base)
    try:
        await wait_banner(server, timeout)
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(stop_all, [server])


# --- other commands ---------------------------------------------------------------------------------------------
def run_cli(args: Sequence[str], env: Mapping[str, str], timeout: float, what: str) -> str:
    """``python -m pocketbridge <args>`` with exactly ``env``, bounded; its output, or ProcessError with it."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pocketbridge", *args],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ProcessError(f"{what} did not finish within {timeout:g} s") from None
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise ProcessError(f"{what} failed (exit {done.returncode}): {output[-2000:]}")
    return output


def keygen(path: Path, timeout: float = 30.0, *, env: Mapping[str, str] | None = None) -> str:
    """``python -m pocketbridge keygen --out path``; the public key (hex) it printed."""
    output = run_cli(["keygen", "--out", str(path)], clean_env({}) if env is None else env, timeout, "keygen")
    match = _KEYGEN_RE.search(output)
    if match is None:
        raise ProcessError(f"keygen printed no public key: {output!r}")
    return match.group(1)


# --- diagnosis ------------------------------------------------------------------------------------------------
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
        # IPv4: little-endian hex
        host = ".".join(str(b) for b in reversed(bytes.fromhex(address))) if len(address) == 8 else address
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
