"""A reload that changes [retention] applies it at once (the log's "applied: retention" is true): the purge
runs right away with the new settings instead of after the old purge_interval."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import trio

from pocketbridge.app import Daemon
from pocketbridge.client import DeviceKey, connect, new_device_id
from pocketbridge.config import load_config

CONFIG = """
[server]
data_dir = "{data}"
[listen]
ws = "127.0.0.1:0"
http = "127.0.0.1:0"
[limits]
clock_skew = 1
[retention]
purge_interval = {interval}
"""


def events(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


async def test_reloaded_retention_purges_at_once(tmp_path: Path) -> None:
    path, data = tmp_path / "pocketbridge.toml", tmp_path / "data"
    path.write_text(CONFIG.format(data=data, interval=86_400))
    daemon = Daemon(load_config(path, env={}), config_path=str(path))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(daemon.run)
            async with connect(running.ws_url, DeviceKey.generate(), new_device_id()) as a:
                ttl = int(time.time() * 1000) + 1500
                assert (await a.send_event("notes:x", "note:text", b"short-lived", ttl=ttl)).status == "stored"
            await trio.sleep(3)  # expired, past the clock-skew grace; the purge would wait a day
            db = daemon.config.sqlite_path()
            assert await trio.to_thread.run_sync(events, db) == 1
            path.write_text(CONFIG.format(data=data, interval=3600))
            assert daemon.reload() == []
            while await trio.to_thread.run_sync(events, db):
                await trio.sleep(0.1)
            daemon.stop()
