"""Refusals by a rate limit are counted in metrics and written to the audit trail at most once per
(address or user, limit) per minute (protocol.md §10.4, the audit trail)."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import httpx
import trio

from trio_websocket import ConnectionClosed

from tests.conftest import make_config, run_daemon
from tests.e2e.rawclient import UpgradeRejected, WireSocket


def audit_rows(db: Path, action: str) -> list[tuple[str, str]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT peer, detail FROM audit_log WHERE action = ?", (action,)).fetchall()
    finally:
        conn.close()


async def test_flood_of_refused_requests_writes_one_audit_row(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", http={"unauthenticated_per_ip_per_minute": 5},
                         limits={"ws_connects_per_ip_per_minute": 5})
    with trio.fail_after(60):
        async with run_daemon(config) as (_, running):
            async with httpx.AsyncClient(base_url=running.http_url, timeout=10) as http:
                statuses = [(await http.get("/api/devices")).status_code for _ in range(300)]
                assert statuses.count(429) >= 290
                metrics = (await http.get("/metrics")).text
                assert 'pocketbridge_rate_limited_total{limit="http_unauthenticated"}' in metrics
                refused = 0
                for _ in range(60):
                    with contextlib.suppress(UpgradeRejected, OSError):
                        async with WireSocket.open(running.ws_url) as ws:
                            with trio.move_on_after(2):  # an admitted connection waits for its handshake
                                try:
                                    await ws.get_message()
                                except ConnectionClosed as closed:
                                    refused += closed.reason.code == 1008
                assert refused >= 50
            await trio.sleep(1.5)  # the audit trail is written with the store's next flush (≤ 1 s)
            http_rows = audit_rows(config.sqlite_path(), "rate_limited")
    by_limit = {detail for _, detail in http_rows}
    assert {"http_unauthenticated", "ws_connects_per_ip"} <= by_limit, http_rows
    assert len(http_rows) == 2, f"{len(http_rows)} audit rows for 2 limits hit ~300 times by one address"
