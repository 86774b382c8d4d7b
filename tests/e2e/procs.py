"""Daemon processes for the scale-out tests: ``python -m pocketbridge serve`` with its config in the environment.

    key = keygen(tmp / "identity.key")
    with serve_cluster([env1, env2], tmp) as (one, two):
        one.ws_url, two.http_url, one.server_key ...

The configuration is passed only as ``PB_<SECTION>_<KEY>`` variables (any inherited ``PB_*`` variable is
dropped first). The URLs are parsed from the startup banner on stdout, within a timeout. stdout and stderr go
to files in the work directory (stderr holds the daemon's log, for diagnosis); a tail of both is printed when
the process is stopped, so a failing test shows it in its captured output. Every process is stopped in a
``finally``: SIGTERM, a bounded wait, then SIGKILL and wait. Synchronous on purpose, so module-scoped
fixtures can share a running cluster between trio tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import attrs

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0  # seconds for a process to print its banner
STOP_TIMEOUT = 10.0  # seconds after SIGTERM before SIGKILL
TAIL_LINES = 40

_WS_RE = re.compile(r"WebSocket URL:\s+(ws://\S+)")
_HTTP_RE = re.compile(r"HTTP API:\s+(http://\S+)")
_KEY_RE = re.compile(r"server public key:\s+([0-9a-f]{64})")
_KEYGEN_RE = re.compile(r"public key:\s+([0-9a-f]{64})")

# Settings every test process gets (overridable): loopback ephemeral ports, quick drain, per-address limits
# high enough for a test suite that connects everything from 127.0.0.1.
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
    """A daemon process failed to start (the message carries its output)."""


def _clean_env(overrides: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PB_")}
    env.update(BASE_ENV)
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<unreadable>"
    return "\n".join(text.splitlines()[-lines:])


def keygen(path: Path, timeout: float = 30.0) -> str:
    """``python -m pocketbridge keygen --out path``; returns the public key (hex) it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "pocketbridge", "keygen", "--out", str(path)],
        cwd=REPO_ROOT,
        env=_clean_env({}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise ProcessError(f"keygen failed ({result.returncode}): {result.stdout}\n{result.stderr}")
    match = _KEYGEN_RE.search(result.stdout)
    if match is None:
        raise ProcessError(f"keygen printed no public key: {result.stdout!r}")
    return match.group(1)


@attrs.define
class ServerProcess:
    """A running ``pocketbridge serve`` process."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    ws_url: str = ""
    http_url: str = ""
    server_key: str = ""

    def poll_banner(self) -> bool:
        """Parse the banner from stdout; True once both URLs and the key are known."""
        text = self.stdout_path.read_text(errors="replace")
        ws, http, key = _WS_RE.search(text), _HTTP_RE.search(text), _KEY_RE.search(text)
        if ws and http and key:
            self.ws_url, self.http_url, self.server_key = ws.group(1), http.group(1), key.group(1)
            return True
        return False

    def describe(self) -> str:
        return (
            f"--- {self.name} (pid {self.proc.pid}, exit {self.proc.returncode}) stdout:\n{_tail(self.stdout_path)}\n"
            f"--- {self.name} stderr ({self.stderr_path}):\n{_tail(self.stderr_path)}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL and wait. Returns the exit status."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)


def _spawn(name: str, env: Mapping[str, str], workdir: Path) -> ServerProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = workdir / f"{name}.stdout", workdir / f"{name}.stderr"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pocketbridge", "serve"],
            cwd=REPO_ROOT,
            env=_clean_env(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
    return ServerProcess(name, proc, stdout_path, stderr_path)


def _wait_started(servers: Sequence[ServerProcess], timeout: float) -> None:
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
) -> Iterator[list[ServerProcess]]:
    """Start one process per env (in parallel), wait for all banners, yield them; always stop them all."""
    names = list(names) if names is not None else [f"instance{i}" for i in range(1, len(envs) + 1)]
    servers: list[ServerProcess] = []
    try:
        for name, env in zip(names, envs, strict=True):
            servers.append(_spawn(name, env, workdir))
        _wait_started(servers, timeout)
        yield servers
    finally:
        errors: list[BaseException] = []
        for server in servers:
            try:
                server.stop()
            except BaseException as exc:  # noqa: BLE001 (keep stopping the others; never leave a process behind)
                errors.append(exc)
                with contextlib.suppress(BaseException):
                    server.kill()
            print(server.describe())
        if errors:
            raise errors[0]


@contextlib.contextmanager
def serve(
    env: Mapping[str, str], workdir: Path, *, name: str = "instance1", timeout: float = START_TIMEOUT
) -> Iterator[ServerProcess]:
    """One process (see :func:`serve_cluster`)."""
    with serve_cluster([env], workdir, names=[name], timeout=timeout) as (server,):
        yield server
