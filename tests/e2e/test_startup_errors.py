"""Start-up failures are one line naming the setting, its variable and what to do; the exit status is
non-zero and no traceback is printed (it is logged at debug level only)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pocketbridge.bench.launcher import clean_env

pytestmark = pytest.mark.slow


def serve(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    full = clean_env({"PB_SERVER_DATA_DIR": str(tmp_path / "data"), **env})
    return subprocess.run([sys.executable, "-m", "pocketbridge", "serve"], env=full, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


def taken_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def assert_one_line(result: subprocess.CompletedProcess[str], expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pocketbridge: ") and expected in last, last


@pytest.mark.parametrize("key", ["ws", "http"])
def test_busy_port(tmp_path: Path, key: str) -> None:
    with taken_port() as s:
        address = f"127.0.0.1:{s.getsockname()[1]}"
        result = serve({f"PB_LISTEN_{key.upper()}": address}, tmp_path)
    assert_one_line(result, f"[listen] {key} {address} is already in use (PB_LISTEN_{key.upper()})")


def test_unusable_data_dir(tmp_path: Path) -> None:
    result = serve({"PB_SERVER_DATA_DIR": "/proc/nope"}, tmp_path)
    assert_one_line(result, "[server] data_dir /proc/nope cannot be used (PB_SERVER_DATA_DIR)")


def test_unreachable_database(tmp_path: Path) -> None:
    with taken_port() as s:  # listening, but never answering as PostgreSQL: then closed
        port = s.getsockname()[1]
    result = serve({"PB_STORAGE_BACKEND": "postgres", "PB_STORAGE_DSN": f"postgresql://pb@127.0.0.1:{port}/pb",
                    "PB_STORAGE_OP_TIMEOUT": "2"}, tmp_path)
    assert_one_line(result, "PostgreSQL")
    assert "PB_STORAGE_DSN" in result.stderr


def test_traceback_only_at_debug_level(tmp_path: Path) -> None:
    result = serve({"PB_SERVER_DATA_DIR": "/proc/nope", "PB_LOG_LEVEL": "debug"}, tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert os.path.exists(tmp_path) and "cannot be used" in result.stderr.strip().splitlines()[-1]
