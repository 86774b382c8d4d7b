"""Start and stop a private ``pocketbridge serve`` subprocess for the benchmark (loopback only)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from ..config import SECTIONS, Config, load_config

HOST = "127.0.0.1"
BIG = 1_000_000_000


def free_port() -> int:
    """A currently free loopback TCP port (tiny race with other programs, acceptable for a benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _known(section: str, key: str) -> bool:
    cls = SECTIONS.get(section)
    return cls is not None and any(a.name == key for a in attrs.fields(cls))


def bench_overrides(data_dir: Path, ws_port: int, http_port: int, *, devices: int, log_level: str) -> dict[str, str]:
    """The ``PB_<SECTION>_<KEY>`` variables of the benchmark daemon (keys the config doesn't know are left out)."""
    wanted: dict[tuple[str, str], Any] = {
        ("server", "data_dir"): data_dir,
        ("server", "identity_key_file"): data_dir / "identity.key",
        ("storage", "path"): data_dir / "pocketbridge.db",
        ("listen", "ws"): f"{HOST}:{ws_port}",
        ("listen", "http"): f"{HOST}:{http_port}",
        # the load generator is one user-agent on one address: lift the per-user and per-address limits
        ("limits", "events_per_user_per_minute"): BIG,
        ("limits", "event_burst_per_user"): BIG,
        ("limits", "ws_connections_per_ip"): BIG,
        ("limits", "ws_connects_per_ip_per_minute"): BIG,
        ("limits", "handshakes_per_ip_per_minute"): BIG,
        ("limits", "max_devices_per_user"): max(5, devices + 2),
        ("drain", "window"): 0.5,
        ("drain", "deadline"): 3,
        ("log", "level"): log_level,
    }
    return {f"PB_{sec.upper()}_{key.upper()}": str(value) for (sec, key), value in wanted.items() if _known(sec, key)}


def describe_config(config: Config) -> dict[str, Any]:
    """The daemon settings that matter for the figures."""
    s, lim, ws = config.storage, config.limits, config.ws
    out: dict[str, Any] = {
        "storage_backend": s.backend,
        "bus_backend": config.bus.backend,
        "storage_batch_size": s.batch_size,
        "log_level": config.log.level,
        "ws_send_queue_messages": ws.send_queue_messages,
        "ws_max_tracked_deliveries": ws.max_tracked_deliveries,
        "events_per_user_per_minute": lim.events_per_user_per_minute,
        "event_burst_per_user": lim.event_burst_per_user,
        "replay_max_page_size": config.replay.max_page_size,
    }
    if s.backend == "sqlite":
        out["sqlite_synchronous"] = s.sqlite_synchronous
    return out


class DaemonProcess:
    """``python -m pocketbridge serve`` with a fresh data dir on free loopback ports; always stop() it."""

    def __init__(self, *, config_file: str | None, devices: int, log_level: str, keep_dir: bool = False) -> None:
        self.config_file = config_file
        self.devices = devices
        self.log_level = log_level
        self.keep_dir = keep_dir
        self.dir = Path(tempfile.mkdtemp(prefix="pb-bench-"))
        self.ws_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.ws_port:
            self.http_port = free_port()
        self.overrides = bench_overrides(
            self.dir / "data", self.ws_port, self.http_port, devices=devices, log_level=log_level
        )
        self.env = {k: v for k, v in os.environ.items() if k != "PB_CONFIG"}
        self.env.update(self.overrides)
        self.config = load_config(config_file, env=self.env)  # raises ConfigError early, with every problem
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "daemon.log"

    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.ws_port}/ws"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30.0) -> None:
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pocketbridge", "serve"]
        if self.config_file:
            cmd += ["--config", self.config_file]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.dir
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                with socket.create_connection((HOST, self.ws_port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not accept connections within {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no daemon log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; then remove the data dir. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
