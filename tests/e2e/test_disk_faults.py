"""Real faults on the embedded default: a full disk, free space below ``[storage] min_free_bytes``, SIGKILL.

The full-disk tests put the data directory on a small tmpfs the test mounts (this needs root: CI runs as
root; elsewhere they are skipped with the reason, under CI=true they fail). protocol.md §5.2–§5.5.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from pocketbridge.bench.launcher import running
from pocketbridge.client import Client, ClientError, DeviceKey, ReceivedEvent, connect, new_device_id
from tests.conftest import IN_CI, make_config, run_daemon
from tests.e2e.test_store_faults import Receiver, session

MiB = 1024 * 1024
STREAM = "clipboard:main"
HIGH = {"ws_connects_per_ip_per_minute": 10_000, "handshakes_per_ip_per_minute": 10_000}


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (unmounted after)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {result.stderr.strip()}"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write a filler file until the filesystem has at most ``leave`` bytes free; returns it."""
    filler = directory / "filler"
    chunk = b"\0" * MiB
    with open(filler, "wb") as f:
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(4096, min(MiB, free - leave))])
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def payload(n: int, tag: str) -> bytes:
    return (tag.encode() * (n // len(tag) + 1))[:n]


async def test_disk_full_refuses_with_1013_and_recovers_without_loss(tmp_path: Path) -> None:
    """The data directory's filesystem fills up while A sends to B (acking like the web client): A's
    event fails to commit and A gets 1013 (no ack, nothing relayed), handshakes get 1013, /health says the
    disk is full. Space comes back: the daemon recovers by itself; C commits first, then A resends; B ends
    with every event exactly once, live and after a replay."""
    with small_filesystem(tmp_path / "fs", "24m") as fs:
        config = make_config(fs / "data", storage={"min_free_bytes": 0}, limits=HIGH)
        key = DeviceKey.generate()
        dev_a, dev_b, dev_c = new_device_id(), new_device_id(), new_device_id()
        with trio.fail_after(90):
            async with run_daemon(config) as (_, running_), httpx.AsyncClient(timeout=10) as http:
                url = running_.ws_url
                acked: set[str] = set()
                async with trio.open_nursery() as nursery, session(url, key, dev_b, ack_event_ids=False) as b:
                    receiver = Receiver(b)
                    nursery.start_soon(receiver.run)
                    async with session(url, key, dev_a) as a:
                        ack = await a.send_event(STREAM, "clipboard:text", b"before")
                        acked.add(ack.event_id)
                        await receiver.wait_for(acked)
                        filler = await trio.to_thread.run_sync(fill, fs)
                        big = payload(256 * 1024, "full-disk ")
                        seq, eid, pending = await a.post_event(STREAM, "clipboard:text", big)
                        with pytest.raises(ClientError):
                            answer = await a.wait_ack(seq, pending)
                            raise AssertionError(f"acked on a full disk: {answer}")
                        assert a.close_code == 1013, (a.close_code, a.close_reason)
                    r = await http.get(f"{running_.http_url}/health")
                    assert r.status_code == 503 and r.json()["services"]["database"] == "storage_full", r.text
                    assert "disk" in r.json()["hint"]
                    await trio.sleep(0.5)
                    assert eid not in {e.event_id for e in receiver.seen}, "an event that was never stored was relayed"
                    # while full, new sessions are refused with 1013 (admission writes)
                    with pytest.raises(ClientError) as refused:
                        async with connect(url, key, new_device_id(), reply_timeout=5):
                            pass
                    assert getattr(refused.value, "code", None) == 1013

                    # --- space comes back: no restart ---
                    filler.unlink()
                    with trio.fail_after(15):
                        while (await http.get(f"{running_.http_url}/health")).status_code != 200:
                            await trio.sleep(0.3)
                    async with session(url, key, dev_c) as c:
                        acked.add((await c.send_event(STREAM, "clipboard:text", b"from c")).event_id)
                    async with session(url, key, dev_a) as a:
                        ack = await a.send_event(STREAM, "clipboard:text", big, device_seq=seq, event_id=eid)
                        assert ack.status == "stored", ack
                        acked.add(eid)
                    await receiver.wait_for(acked)
                    nursery.cancel_scope.cancel()
                live = [e.event_id for e in receiver.seen]
                assert sorted(live) == sorted(set(live)), "B got an event twice"
                async with session(url, key, dev_b, ack_event_ids=False) as b:
                    replayed = [e.event_id for e in (await b.replay()).events]
                assert not replayed, "B acked everything it got: the replay must be empty"
                assert set(live) == acked


async def test_below_min_free_bytes_events_are_rejected_storage_full(tmp_path: Path) -> None:
    """Below ``[storage] min_free_bytes`` new events get a rejection ack STORAGE_FULL (counted in
    pocketbridge_events_total{outcome="storage_full"}) before SQLite can hit ENOSPC; /health says why;
    once space is freed, events are stored again."""
    with small_filesystem(tmp_path / "fs", "32m") as fs:
        config = make_config(fs / "data", storage={"min_free_bytes": 12 * MiB}, limits=HIGH)
        key = DeviceKey.generate()
        with trio.fail_after(60):
            async with run_daemon(config) as (_, running_), httpx.AsyncClient(timeout=10) as http:
                async with session(running_.ws_url, key, new_device_id()) as a:
                    assert (await a.send_event(STREAM, "clipboard:text", b"plenty of space")).status == "stored"
                    filler = await trio.to_thread.run_sync(fill, fs, 8 * MiB)
                    await trio.sleep(0.6)  # free space is checked at most twice a second
                    ack = await a.send_event(STREAM, "clipboard:text", b"low on space")
                    assert (ack.status, ack.code) == ("rejected", "STORAGE_FULL"), ack
                    assert ack.error
                    r = await http.get(f"{running_.http_url}/health")
                    assert r.status_code == 503 and r.json()["services"]["database"] == "storage_low", r.text
                    metrics = (await http.get(f"{running_.http_url}/metrics")).text
                    assert 'pocketbridge_events_total{outcome="storage_full"} 1.0' in metrics
                    filler.unlink()
                    await trio.sleep(0.6)
                    assert (await a.send_event(STREAM, "clipboard:text", b"space again")).status == "stored"


def _db_state(path: Path, user_id: str, device_id: str) -> tuple[dict[str, int], int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT event_id, device_seq FROM events WHERE user_id = ?", (user_id,)).fetchall()
        (last_ack,) = conn.execute("SELECT last_ack_device_seq FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    finally:
        conn.close()
    return {eid: seq for eid, seq in rows}, int(last_ack)


@pytest.mark.slow
async def test_sigkill_mid_stream_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """A streams with a window of unacked events while B receives live; the daemon is SIGKILLed mid-stream
    and started again on the same data. Every acked event is stored, last_ack_device_seq covers every ack,
    resending the unacked ones stores each exactly once, and B ends holding every event exactly once (live
    before the kill + replay after; only acks of its last moment, persisted lazily, are re-delivered)."""
    data = tmp_path / "data"
    env = {"PB_SERVER_DATA_DIR": str(data)}
    key = DeviceKey.generate()
    dev_a, dev_b = new_device_id(), new_device_id()
    sent: dict[int, tuple[str, bytes]] = {}  # device_seq -> (event_id, payload)
    acked: dict[int, str] = {}
    live: list[ReceivedEvent] = []
    with trio.fail_after(120):
        async with running("before", tmp_path / "p1", env) as server:
            async with trio.open_nursery() as nursery:
                async def receive(b: Client) -> None:
                    with contextlib.suppress(ClientError):
                        async for event in b.events(ack=True):
                            live.append(event)

                # B's connection ends with the kill (a Closed on the way out is expected; a failed check is not)
                with contextlib.suppress(ClientError):
                    async with connect(server.ws_url, key, dev_b, ack_event_ids=False, reply_timeout=10) as b:
                        nursery.start_soon(receive, b)
                        async with connect(server.ws_url, key, dev_a, reply_timeout=10) as a:
                            window: list[tuple[int, str, object]] = []
                            with contextlib.suppress(ClientError):
                                for i in range(100_000):
                                    data_i = payload(2048, f"event {i} ")
                                    seq, eid, pending = await a.post_event(STREAM, "clipboard:text", data_i)
                                    sent[seq] = (eid, data_i)
                                    window.append((seq, eid, pending))
                                    if len(window) >= 8:
                                        s, e, p = window.pop(0)
                                        ack = await a.wait_ack(s, p)  # type: ignore[arg-type]
                                        assert ack.status == "stored"
                                        acked[s] = e
                                    if len(acked) == 200:
                                        os.kill(server.proc.pid, signal.SIGKILL)
                            for s, e, p in window:
                                if p.done.is_set() and p.ack is not None and p.ack.status == "stored":  # type: ignore[attr-defined]
                                    acked[s] = e
                nursery.cancel_scope.cancel()
        assert server.proc.returncode == -signal.SIGKILL
        assert len(acked) >= 200 and len(sent) > len(acked)

        stored, last_ack = await trio.to_thread.run_sync(_db_state, data / "pocketbridge.db", key.public_hex, dev_a)
        assert set(acked.values()) <= set(stored), "an acked event was lost"
        assert last_ack >= max(acked), (last_ack, max(acked))

        async with running("after", tmp_path / "p2", env) as server:
            async with connect(server.ws_url, key, dev_a, reply_timeout=10) as a:
                for seq in sorted(sent):
                    if seq in acked:
                        continue
                    eid, data_i = sent[seq]
                    ack = await a.send_event(STREAM, "clipboard:text", data_i, device_seq=seq, event_id=eid)
                    assert ack.status in ("stored", "duplicate"), ack
            stored, _ = await trio.to_thread.run_sync(_db_state, data / "pocketbridge.db", key.public_hex, dev_a)
            assert set(stored) == {eid for eid, _ in sent.values()}
            assert sorted(stored.values()) == sorted(sent), "each event is stored exactly once"
            async with connect(server.ws_url, key, dev_b, ack_event_ids=False, reply_timeout=10) as b:
                replayed = (await b.replay()).events
        got = [e.event_id for e in live] + [e.event_id for e in replayed]
        assert set(got) == {eid for eid, _ in sent.values()}, "B is missing events"
        assert len({e.event_id for e in replayed}) == len(replayed), "a replay repeated an event"
        # B's acks are persisted lazily (protocol.md §6.2: at most a second late): what the kill lost is
        # re-delivered, and only that: the events B got twice are the newest it had received live, after
        # the persisted cursor. B holds every event once (a client keeps events by event_id).
        again = [e.event_id for e in live if e.event_id in {r.event_id for r in replayed}]
        assert again == [e.event_id for e in live[len(live) - len(again):]], "a re-delivered event is not in the tail"
        assert all(base64.b64decode(e.encrypted_payload) == sent[e.device_seq][1] for e in replayed)
