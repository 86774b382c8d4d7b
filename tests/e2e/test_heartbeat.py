"""Protocol heartbeat (§4): pings every [ws] ping_interval; no pong for [ws] pong_timeout closes 1008."""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed

from pocketbridge.client import DeviceKey
from tests.conftest import run_daemon
from tests.e2e.rawclient import RawHandshake, WireSocket


async def test_a_peer_that_never_answers_pings_is_closed_with_heartbeat_timeout(config_factory):
    config = config_factory(ws={"ping_interval": 0.2, "pong_timeout": 1.0})
    async with run_daemon(config) as (_, running), WireSocket.open(running.ws_url) as ws:
        with trio.fail_after(5):
            await RawHandshake(ws, DeviceKey.generate()).run()
            started = trio.current_time()
            await trio.sleep(1.8)  # not reading: pings pile up unanswered, no pong goes out
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as exc:
                assert (exc.reason.code, exc.reason.reason) == (1008, "Heartbeat timeout")
            assert trio.current_time() - started >= 1.0


async def test_a_peer_that_answers_pings_stays_connected(config_factory):
    config = config_factory(ws={"ping_interval": 0.2, "pong_timeout": 1.0})
    async with run_daemon(config) as (_, running), WireSocket.open(running.ws_url) as ws:
        with trio.fail_after(5):
            await RawHandshake(ws, DeviceKey.generate()).run()
            with trio.move_on_after(2.5):  # reading answers every ping
                while True:
                    await ws.get_message()
            await ws.send_message(json.dumps({"type": "ping"}))
            assert json.loads(await ws.get_message())["type"] == "pong"
