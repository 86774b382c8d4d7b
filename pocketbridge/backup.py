"""``pocketbridge backup``: a consistent copy of the embedded store while the daemon serves.

SQLite's online backup API copies a snapshot (what is still in the WAL included) page by page, letting the
daemon's writer go on between steps; the copy is integrity-checked and written with mode 0600 under a
temporary name, then renamed, so a half-written backup never has the final name. PostgreSQL deployments
back up with ``pg_dump`` (the command is printed).
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import attrs

from .config import Config
from .errors import PocketBridgeError

PAGES_PER_STEP = 1024  # pages copied between two looks at the source (the daemon writes in between)
STEP_PAUSE = 0.001  # seconds


@attrs.frozen
class BackupResult:
    path: Path
    bytes: int
    users: int
    devices: int
    events: int
    seconds: float


def backup_sqlite(source: Path, out: Path, *, force: bool = False) -> BackupResult:
    """Copy the SQLite store at ``source`` to ``out`` (mode 0600); PocketBridgeError if it cannot be done."""
    if not source.exists():
        raise PocketBridgeError(f"no SQLite store at {source} (check [server] data_dir / [storage] path)")
    if out.exists() and not force:
        raise PocketBridgeError(f"{out} exists; use --force to replace it")
    started = time.monotonic()
    partial = out.with_name(f".{out.name}.partial")
    partial.unlink(missing_ok=True)
    os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # never readable by others
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst, pages=PAGES_PER_STEP, sleep=STEP_PAUSE)
            (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise PocketBridgeError(f"the copy failed its integrity check: {check}")
            counts = [dst.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("users", "devices", "events")]
        finally:
            dst.close()
            src.close()
        os.chmod(partial, 0o600)
        os.replace(partial, out)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise PocketBridgeError(f"backup failed: {exc}") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    users, devices, events = counts
    return BackupResult(out, out.stat().st_size, users, devices, events, time.monotonic() - started)


def pg_dump_hint(config: Config) -> str:
    return (
        "the store is PostgreSQL: back it up with pg_dump (the password is not printed here), e.g.\n"
        "  pg_dump --format=custom --file=pocketbridge-$(date +%F).dump \"$PB_STORAGE_DSN\"\n"
        "and restore with pg_restore; see docs/operations.md, \"Backup and restore\""
    )
