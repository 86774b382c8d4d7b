"""The benchmark's lean WebSocket client (``pocketbridge.bench.lean``) against a real daemon, and its frame
handling against hand-written server frames over a real socket pair."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio

from pocketbridge.bench import lean
from pocketbridge.bench.wire import CLOSE, CONTINUATION, PING, PONG, TEXT, UpgradeRejected, masked
from pocketbridge.client import ClientError, Closed, DeviceKey, connect, event_message, new_device_id
from pocketbridge.protocol.envelope import encode
from tests.conftest import make_config, run_daemon


def event_frame(client: lean.LeanClient) -> str:
    seq = client.take_seq()
    return encode(event_message(client.user_id, client.device_id, seq, "clipboard:main", "clipboard:text", b"\0\1\2"))


async def test_an_event_is_relayed_acked_and_not_replayed_again(tmp_path: Path) -> None:
    key = DeviceKey.generate()
    receiver_id = new_device_id()
    received: list[dict] = []
    acks: list[dict] = []
    got_event, got_ack, got_pong = trio.Event(), trio.Event(), trio.Event()
    async with run_daemon(make_config(tmp_path / "data")) as (_, running):
        with trio.fail_after(10):
            async with (
                lean.connect(running.ws_url, key, receiver_id) as receiver,
                lean.connect(running.ws_url, key, new_device_id()) as sender,
                trio.open_nursery() as nursery,
            ):
                assert sender.next_seq == 1 and sender.user_id == key.public_hex

                def on_receiver(text: str) -> str | None:
                    msg = json.loads(text)
                    if msg["type"] == "pong":
                        got_pong.set()
                    if msg["type"] != "event":
                        return None
                    received.append(msg["payload"])
                    got_event.set()
                    return encode({"type": "ack", "payload": {"device_seq": msg["payload"]["device_seq"]}})

                def on_sender(text: str) -> None:
                    msg = json.loads(text)
                    if msg["type"] == "ack":
                        acks.append(msg["payload"])
                        got_ack.set()

                nursery.start_soon(receiver.ws.run, on_receiver)
                nursery.start_soon(sender.ws.run, on_sender)
                await sender.ws.send_message(event_frame(sender))
                await got_ack.wait()
                await got_event.wait()
                # the daemon answers a connection's messages in order: once the pong is back, the ack was taken
                await receiver.ws.send_message(encode({"type": "ping"}))
                await got_pong.wait()
                nursery.cancel_scope.cancel()
            assert acks[0]["device_seq"] == 1 and acks[0]["status"] == "stored"
            assert received[0]["encrypted_payload"] == "AAEC" and len(received) == 1
            # the receiver's ack (a masked frame of the lean client) was taken: nothing is left to replay
            async with connect(running.ws_url, key, receiver_id) as again:
                assert (await again.replay()).events == []


async def test_replay_pages_acks_and_a_full_resync(tmp_path: Path) -> None:
    """``LeanClient.replay`` follows continuation tokens, acks each event (a second replay of the same device
    finds nothing) and returns the ``full_resync_required`` payload when too many events were missed."""
    key = DeviceKey.generate()
    replayer_id = new_device_id()
    config = make_config(tmp_path / "data", replay={"full_resync_threshold": 30})
    async with run_daemon(config) as (_, running):
        with trio.fail_after(20):
            async with connect(running.ws_url, key, new_device_id()) as sender:
                for i in range(25):
                    await sender.send_event("clipboard:main", "clipboard:text", bytes([i]))
            async with lean.connect(running.ws_url, key, replayer_id, device_type=None) as device:
                result = await device.replay(limit=7)
                assert result.full_resync is None and result.pages == 4 and result.total_events == 25
                assert [e.payload for e in result.events] == [bytes([i]) for i in range(25)]
                assert await device.ping() > 0  # every ack before it was handled
            async with lean.connect(running.ws_url, key, replayer_id, device_type=None) as device:
                again = await device.replay(limit=7)
                assert again.events == [] and again.full_resync is None
            async with connect(running.ws_url, key, new_device_id()) as sender:
                for i in range(31):
                    await sender.send_event("clipboard:main", "clipboard:text", bytes([i]))
            async with lean.connect(running.ws_url, key, new_device_id(), device_type=None) as fresh:
                resync = await fresh.replay(limit=100)
                assert resync.events == [] and resync.pages == 0
                assert resync.full_resync is not None and resync.full_resync["reason"] == "too_many_events"


async def test_pings_are_answered_and_a_server_close_is_raised(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", ws={"ping_interval": 0.2, "pong_timeout": 1.0})
    async with run_daemon(config) as (_, running):
        with trio.fail_after(10):
            async with lean.connect(running.ws_url, DeviceKey.generate(), new_device_id()) as client:
                pongs: list[str] = []
                with trio.move_on_after(2.0):  # reading answers every ping: still open after twice pong_timeout
                    await client.ws.run(lambda text: pongs.append(text) if "pong" in text else None)
                await client.ws.send_message(encode({"type": "ping"}))
                with trio.move_on_after(2.0):
                    await client.ws.run(lambda text: pongs.append(text) if "pong" in text else None)
                assert pongs and json.loads(pongs[0])["type"] == "pong"
            async with lean.connect(running.ws_url, DeviceKey.generate(), new_device_id()) as silent:
                await trio.sleep(1.8)  # not reading: no pong goes out, the daemon closes
                with pytest.raises(Closed) as closed:
                    await silent.ws.run(lambda text: None)
                assert (closed.value.code, closed.value.reason) == (1008, "Heartbeat timeout")


async def test_an_upgrade_refused_says_its_status(tmp_path: Path) -> None:
    async with run_daemon(make_config(tmp_path / "data")) as (_, running):
        with trio.fail_after(10), pytest.raises(UpgradeRejected) as refused:
            async with lean.LeanSocket.open(running.ws_url.replace("/ws", "/elsewhere")):
                pass
        assert refused.value.status_code == 404


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    assert len(payload) < 126
    return bytes([(0x80 if fin else 0) | opcode, len(payload)]) + payload


def read_client_frames(peer: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` masked client frames from ``peer`` (small ones), unmasked."""
    frames = []
    data = b""
    while len(frames) < count:
        data += peer.recv(65536)
        while len(data) >= 6:
            n = data[1] & 0x7F
            assert data[1] & 0x80 and n < 126, "client frames are masked"
            if len(data) < 6 + n:
                break
            frames.append((data[0] & 0x0F, masked(data[6 : 6 + n], data[2:6])))
            data = data[6 + n :]
    return frames


async def test_fragments_pings_and_a_close_from_a_hand_made_server() -> None:
    mine, peer = socket.socketpair()
    mine.setblocking(False)
    ws = lean.LeanSocket(mine, timeout=5.0)
    try:
        with trio.fail_after(5):
            peer.sendall(
                server_frame(TEXT, b'{"a":"', fin=False)
                + server_frame(PING, b"hb")
                + server_frame(CONTINUATION, "\u00e9\"}".encode()[:1], fin=False)
            )
            peer.sendall(server_frame(CONTINUATION, "\u00e9\"}".encode()[1:]) + server_frame(PONG, b""))
            peer.sendall(server_frame(TEXT, b"second")[:3])  # a frame split across reads
            first = await ws.get_message()
            assert json.loads(first) == {"a": "\u00e9"}
            peer.sendall(server_frame(TEXT, b"second")[3:])
            assert await ws.get_message() == "second"
            assert read_client_frames(peer, 1) == [(PONG, b"hb")]
            peer.sendall(server_frame(CLOSE, (1001).to_bytes(2, "big") + b"going away"))
            with pytest.raises(Closed) as closed:
                await ws.get_message()
            assert (closed.value.code, closed.value.reason) == (1001, "going away")
            assert read_client_frames(peer, 1) == [(CLOSE, (1001).to_bytes(2, "big"))]  # the close is answered
            with pytest.raises(Closed):
                await ws.send_message("after the close")
    finally:
        mine.close()
        peer.close()


@pytest.mark.parametrize(
    "frame",
    [
        bytes([0x81, 0x82]) + b"mask" + b"hi",  # a masked server frame
        bytes([0xC1, 0x02]) + b"hi",  # a reserved bit (no extension was agreed)
        server_frame(CONTINUATION, b"x"),  # a continuation with no message started
        server_frame(0x2, b"bin"),  # binary: the protocol sends text only
    ],
)
async def test_frames_the_protocol_does_not_allow_are_errors(frame: bytes) -> None:
    mine, peer = socket.socketpair()
    mine.setblocking(False)
    try:
        peer.sendall(frame)
        with trio.fail_after(5), pytest.raises(ClientError):
            await lean.LeanSocket(mine, timeout=5.0).get_message()
    finally:
        mine.close()
        peer.close()


def test_parse_frame_waits_for_whole_headers_and_payloads() -> None:
    long = bytes([0x81, 126]) + (300).to_bytes(2, "big") + b"x" * 300
    huge_header = bytes([0x81, 127]) + (70000).to_bytes(8, "big")
    assert lean.parse_frame(long[:3], 0) is None
    assert lean.parse_frame(long[:100], 0) is None
    assert lean.parse_frame(b"??" + long, 2) == (TEXT, True, 6, 306)
    assert lean.parse_frame(huge_header, 0) is None
    assert lean.parse_frame(huge_header + b"y" * 70000, 0) == (TEXT, True, 10, 70010)
