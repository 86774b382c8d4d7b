"""Replay statements without a test elsewhere (protocol.md §6.3, §6.6, §9): ``[replay] max_page_bytes``, the
metric for ignored continuation tokens, and ``replay_failed`` while PostgreSQL is unreachable (the connection
stays open, and replay and live delivery work again on it once the store is back)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pocketbridge.client import Client, DeviceKey, connect, new_device_id
from pocketbridge.config import Config
from pocketbridge.protocol.replay import make_token
from tests.conftest import run_daemon
from tests.e2e.rawclient import TIMEOUT, e2e_config
from tests.e2e.tcpproxy import open_tcp_proxy
from tests.e2e.test_spec_transport import local_config, metric_value

MAX_PAGE_BYTES = 10_000


def encoded_size(events: list[dict]) -> int:
    return sum(len(json.dumps(e, separators=(",", ":"))) for e in events)


async def replay_pages(client: Client, limit: int = 100) -> list[dict]:
    """Every page of a fresh replay, following continuation tokens; events are not acked."""
    pages = []
    token = None
    with trio.fail_after(TIMEOUT):
        while True:
            msg = await client.replay_page(limit=limit, token=token)
            assert msg["type"] == "replay_response", msg
            pages.append(msg["payload"])
            if not msg["payload"]["has_more"]:
                return pages
            token = msg["payload"]["continuation_token"]


async def test_replay_pages_end_before_max_page_bytes(config_factory: Callable[..., Config]) -> None:
    """§6.3: a page ends before its encoded events would exceed max_page_bytes, but holds at least one.

    Events of about 4.3 kB: two fit in 10 000 bytes, three do not; one event of 12 kB is a page of its own."""
    config = e2e_config(config_factory, replay={"max_page_bytes": MAX_PAGE_BYTES})
    key = DeviceKey.generate()
    sizes = [3000] * 5 + [9000] + [3000] * 3  # decoded payload bytes (base64: 4000, 12000 characters)
    async with run_daemon(config) as (_, running):
        async with connect(running.ws_url, key, new_device_id()) as a:
            sent = []
            for i, size in enumerate(sizes):
                ack = await a.send_event("files:main", "file:chunk", bytes([i]) * size)
                assert ack.status == "stored"
                sent.append(ack.event_id)
        async with connect(running.ws_url, key, new_device_id()) as b:
            pages = await replay_pages(b, limit=100)
    assert [e["event_id"] for p in pages for e in p["events"]] == sent  # all, once, in order
    assert pages[0]["total_events"] == len(sent)
    for page, following in zip(pages, pages[1:] + [None], strict=True):
        events = page["events"]
        assert page["page_size"] == len(events) >= 1
        if len(events) > 1:
            assert encoded_size(events) <= MAX_PAGE_BYTES, page
        if following is not None:  # it ended because the next event would not fit
            assert encoded_size(events + following["events"][:1]) > MAX_PAGE_BYTES
    assert [p["page_size"] for p in pages] == [2, 2, 1, 1, 2, 1]
    assert encoded_size(pages[3]["events"]) > MAX_PAGE_BYTES  # the big one alone


async def test_ignored_continuation_tokens_are_counted(tmp_path: Path) -> None:
    """§6.3 step 1: a token that fails validation is ignored (fresh replay) and counted in a metric."""
    key = DeviceKey.generate()
    dev_b = new_device_id()
    async with run_daemon(local_config(tmp_path)) as (daemon, running):
        async with connect(running.ws_url, key, new_device_id()) as a:
            for i in range(4):
                assert (await a.send_event("clipboard:main", "clipboard:text", b"%d" % i)).status == "stored"
        name = "pocketbridge_replay_invalid_tokens_total"
        assert await metric_value(running, name) == 0
        async with connect(running.ws_url, key, dev_b) as b:
            first = (await b.replay_page(limit=1))["payload"]
            second = (await b.replay_page(limit=1, token=first["continuation_token"]))["payload"]
            assert "total_events" not in second  # a continuation, not a fresh request
            assert await metric_value(running, name) == 0  # a valid token and none at all: not counted
            expired = make_token(daemon.gateway.token_key, key.public_hex, dev_b, 1, daemon.clock.now_ms() - 7_200_000)
            for bad in ("garbage", first["continuation_token"][:-3] + "AAA", expired):
                page = (await b.replay_page(limit=1, token=bad))["payload"]
                assert page["total_events"] == 3  # served as fresh (the first page was confirmed by its token)
                assert page["events"][0]["event_id"] == second["events"][0]["event_id"]
            assert await metric_value(running, name) == 3
        async with connect(running.ws_url, key, new_device_id()) as c:  # another device's token
            await c.replay_page(limit=1, token=first["continuation_token"])
        assert await metric_value(running, name) == 4


@pytest.mark.postgres
@pytest.mark.redis
async def test_replay_failed_while_the_store_is_unreachable(tmp_path: Path, postgres_dsn: str, redis_url: str) -> None:
    """§6.6 ``replay_failed``: sent when the replay query fails; the connection stays open and, once the
    store is back, the same connection replays and receives live events again."""
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    dbname = conninfo_to_dict(postgres_dsn)["dbname"]
    async with open_tcp_proxy("127.0.0.1", 5432) as proxy:
        dsn = make_conninfo(postgres_dsn, host="127.0.0.1", port=str(proxy.port), dbname=dbname)
        config = local_config(
            tmp_path,
            storage={"backend": "postgres", "dsn": dsn, "op_timeout": 1, "statement_timeout": 1, "pool_size": 2},
            bus={"backend": "redis", "url": redis_url},
        )
        async with run_daemon(config) as (_, running):
            async with connect(running.ws_url, key, dev_a) as a:
                backlog = [(await a.send_event("clipboard:main", "clipboard:text", b"%d" % i)).event_id
                           for i in range(3)]
            async with connect(running.ws_url, key, dev_b) as b:
                proxy.cut()
                with trio.fail_after(TIMEOUT):
                    reply = await b.replay_page(limit=10)
                assert reply == {"type": "replay_failed", "payload": {"error": "Replay failed. Please try again later."}}
                assert await metric_value(running, "pocketbridge_replay_failed_total") == 1
                with trio.fail_after(TIMEOUT):
                    assert await b.ping() > 0  # still open
                proxy.restore()
                with trio.fail_after(15):  # the store is used again after the breaker's cool-down
                    while True:
                        reply = await b.replay_page(limit=10)
                        if reply["type"] == "replay_response":
                            break
                        assert reply["type"] == "replay_failed", reply
                        await trio.sleep(0.2)
                assert [e["event_id"] for e in reply["payload"]["events"]] == backlog
                with trio.fail_after(TIMEOUT):
                    async with connect(running.ws_url, key, dev_a) as a:
                        ack = await a.send_event("clipboard:main", "clipboard:text", b"live")
                    assert (await b.receive_event()).event_id == ack.event_id
