"""`pocketbridge serve` as a person runs it: the banner says what is in use, a second Ctrl+C stops at once,
and the last line says it stopped."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: pocketbridge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def start(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[str], list[str]]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PB_") and k != "NOTIFY_SOCKET"}
    full.update(PB_SERVER_DATA_DIR=str(tmp_path / "data"), PB_LISTEN_WS="127.0.0.1:0", PB_LISTEN_HTTP="127.0.0.1:0",
                PYTHONUNBUFFERED="1", **env)
    proc = subprocess.Popen([sys.executable, "-m", "pocketbridge", "serve"], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    banner: list[str] = []
    while not banner or not banner[-1].startswith("Press Ctrl+C"):
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        banner.append(line.rstrip("\n"))
    return proc, banner


def test_banner_names_what_is_in_use_and_an_orderly_stop_says_stopped(tmp_path: Path) -> None:
    proc, banner = start(tmp_path)
    try:
        text = "\n".join(banner)
        for expected in ("configuration:      built-in defaults and PB_* variables", "storage:            SQLite ",
                         "bus:                in-process", "admin API:          off"):
            assert expected in text, text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == "PocketBridge stopped"


def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    """A client that never answers the close handshake would hold the drain for the close timeout; the second
    SIGINT does not wait for it."""
    proc, banner = start(tmp_path, PB_DRAIN_WINDOW="20", PB_DRAIN_DEADLINE="30", PB_WS_CLOSE_TIMEOUT="20")
    port = int(re.search(r":(\d+)/ws", "\n".join(banner)).group(1))  # type: ignore[union-attr]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(UPGRADE)
            time.sleep(0.3)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=15)
            took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 5, f"the second Ctrl+C took {took:.1f} s"


def test_serve_freezes_its_start_up_heap(tmp_path: Path) -> None:
    """What exists once the daemon has started is moved out of the garbage collector's sight (a full collection of
    it stopped the event loop for 50-70 ms on the benchmark machine): /metrics shows how many objects that is."""
    import urllib.request

    proc, banner = start(tmp_path)
    try:
        http = re.search(r"HTTP API:\s+(http://127\.0\.0\.1:\d+)", "\n".join(banner)).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(f"{http}/metrics", timeout=10) as response:
            text = response.read().decode()
        frozen = re.search(r"^pocketbridge_gc_frozen_objects (\S+)$", text, re.M)
        assert frozen is not None, text
        assert float(frozen.group(1)) > 10_000
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
