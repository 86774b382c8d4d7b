"""Operations: drain on SIGTERM, sd_notify and the watchdog, the systemd unit, SIGHUP reload, log privacy, audit.

The drain and reload tests run the daemon as a real process (``python -m pocketbridge serve``, SQLite in a tmp data
dir, 127.0.0.1 only) and send it real signals; the log and audit tests run it in-process on both backends.
Every wait is bounded and every process is stopped in a ``finally`` (see pocketbridge/bench/launcher.py).
"""

from __future__ import annotations

import base64
import collections
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

import pocketbridge.client
from pocketbridge.bench.launcher import read_text, running, spawn, wait_banner, wait_exit, wait_for_output
from pocketbridge.client import Closed, DeviceKey, HandshakeRefused, connect, new_device_id
from pocketbridge.config import Config
from pocketbridge.logs import setup_logging
from tests.conftest import run_daemon
from tests.e2e.daemon_proc import NotifySocket
from tests.e2e.httpclient import bearer, http_client, pb1_headers, signed
from tests.e2e.rawclient import e2e_config

REPO_ROOT = Path(__file__).resolve().parents[2]
UNIT_FILE = REPO_ROOT / "systemd" / "pocketbridge.service"
T = 10.0  # seconds: the bound of any single wait below unless stated

DRAIN_WINDOW = 1.0
DRAIN_DEADLINE = 10.0
WATCHDOG_USEC = 200_000
CLIENTS = 3
SEND_WINDOW = 8  # events in flight per sender
SHUTTING_DOWN = (1001, "Server shutting down")


def _port(url: str) -> int:
    match = re.search(r":(\d+)(?:/|$)", url.removeprefix("ws://").removeprefix("http://"))
    assert match, url
    return int(match.group(1))


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def _connect_outcome(url: str) -> str | None:
    """Try a new WebSocket session; None if the daemon refused it (connection refused, upgrade or handshake
    refused), else a description of the session that was established."""
    try:
        with trio.fail_after(5):
            async with connect(url, DeviceKey.generate(), new_device_id()) as client:
                return f"session established for {client.device_id[:8]} (user {client.user_id[:8]})"
    except (OSError, HandshakeError, ConnectionClosed, Closed):
        return None
    except BaseExceptionGroup as group:  # trio may wrap the connect error
        if group.subgroup((OSError, HandshakeError, ConnectionClosed, Closed)) is not None:
            return None
        raise


# --- 1. drain on a real SIGTERM ----------------------------------------------------------------------------------
@attrs.define
class Sender:
    """What one client saw: events sent, acks received (stored), and when and how its connection closed."""

    key: DeviceKey
    device_id: str
    sent: dict[str, int] = attrs.Factory(dict)  # event_id -> device_seq (everything handed to the socket)
    acked: set[str] = attrs.Factory(set)  # event ids acked "stored"
    bad_acks: list[Any] = attrs.Factory(list)
    closed_at: float | None = None
    close: tuple[int | None, str | None] | None = None


async def _send_until_closed(client: Any, sender: Sender) -> None:
    """Keep ``SEND_WINDOW`` events in flight (post_event, then wait for the oldest ack) until the server closes."""
    in_flight: collections.deque[tuple[int, str, Any]] = collections.deque()
    try:
        while True:
            while len(in_flight) < SEND_WINDOW:
                event_id = pocketbridge.client.new_event_id()
                sender.sent[event_id] = -1
                seq, event_id, pending = await client.post_event(
                    "ops:drain", "ops:probe", os.urandom(24), event_id=event_id
                )
                sender.sent[event_id] = seq
                in_flight.append((seq, event_id, pending))
                await trio.sleep(0.003)
            seq, event_id, pending = in_flight[0]
            ack = await client.wait_ack(seq, pending)
            in_flight.popleft()
            if ack.status == "stored" and ack.event_id == event_id:
                sender.acked.add(event_id)
            else:
                sender.bad_acks.append(ack)
    except Closed:
        pass
    # acks that arrived before the close frame (the in-flight event is finished first, its ack goes out)
    for seq, event_id, pending in in_flight:
        if pending.ack is not None:
            if pending.ack.status == "stored" and pending.ack.event_id == event_id:
                sender.acked.add(event_id)
            else:
                sender.bad_acks.append(pending.ack)


async def _watch_close(client: Any, sender: Sender) -> None:
    async for _ in client.events():
        pass
    sender.closed_at = trio.current_time()
    sender.close = (client.close_code, client.close_reason)


async def _poll_readiness(http_url: str, log: list[tuple[float, int | None, Any]]) -> None:
    """GET /health/ready as fast as it answers; every outcome is recorded with the time it came."""
    async with httpx.AsyncClient(base_url=http_url, timeout=2.0) as http:
        while True:
            try:
                response = await http.get("/health/ready")
                try:
                    body: Any = response.json()
                except ValueError:
                    body = response.text
                log.append((trio.current_time(), response.status_code, body))
            except httpx.HTTPError as exc:
                log.append((trio.current_time(), None, type(exc).__name__))
            await trio.sleep(0.002)


async def test_sigterm_drains_a_real_process_and_notifies_systemd(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = {
        "PB_SERVER_DATA_DIR": str(data_dir),
        "PB_DRAIN_WINDOW": str(DRAIN_WINDOW),
        "PB_DRAIN_DEADLINE": str(DRAIN_DEADLINE),
        "PB_LIMITS_EVENTS_PER_USER_PER_MINUTE": "1000000",
        "PB_LIMITS_EVENT_BURST_PER_USER": "1000000",
        "PB_LOG_FORMAT": "json",
    }
    senders = [Sender(DeviceKey.generate(), new_device_id()) for _ in range(CLIENTS)]
    ready_log: list[tuple[float, int | None, Any]] = []
    refused_after_first_close: list[str | None] = []

    async with NotifySocket.open() as notify:
        env |= {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        server = spawn("drain", tmp_path, env)
        notify.pid_of = lambda: server.proc.pid
        try:
            ready = await notify.wait_for("READY=1", timeout=30)
            await wait_banner(server)
            ws_port, http_port = _port(server.ws_url), _port(server.http_url)
            # READY=1 came once both listeners were bound (read from /proc when it arrived)
            assert {("127.0.0.1", ws_port), ("127.0.0.1", http_port)} <= ready.listening, (
                ready.listening, server.ws_url, server.http_url)

            async with AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(connect(server.ws_url, s.key, s.device_id)) for s in senders
                ]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_poll_readiness, server.http_url, ready_log)
                    for client, sender in zip(clients, senders, strict=True):
                        nursery.start_soon(_watch_close, client, sender)
                        nursery.start_soon(_send_until_closed, client, sender)
                    # mid-stream: every sender has had events acked and keeps sending, and the watchdog has
                    # been petted a few times
                    with trio.fail_after(T):
                        while min(len(s.acked) for s in senders) < 20 or len(notify.times("WATCHDOG=1")) < 8:
                            await trio.sleep(0.01)
                    term_at = trio.current_time()
                    server.proc.send_signal(signal.SIGTERM)
                    # the first close comes after the listeners stopped accepting: a new session is refused
                    with trio.fail_after(DRAIN_WINDOW + 5):
                        while all(s.closed_at is None for s in senders):
                            await trio.sleep(0.002)
                    refused_after_first_close.append(await _connect_outcome(server.ws_url))
                    with trio.fail_after(DRAIN_WINDOW + 5):
                        while any(s.closed_at is None for s in senders):
                            await trio.sleep(0.01)
                    status = await wait_exit(server, DRAIN_DEADLINE - (trio.current_time() - term_at))
                    exited_after = trio.current_time() - term_at
                    nursery.cancel_scope.cancel()
        finally:
            server.stop()
            print(server.describe())

        # --- what the clients saw
        assert refused_after_first_close == [None], refused_after_first_close
        for sender in senders:
            assert sender.close == SHUTTING_DOWN, (sender.device_id[:8], sender.close)
            assert not sender.bad_acks, sender.bad_acks
        closes = sorted(s.closed_at - term_at for s in senders if s.closed_at is not None)
        # spread over the window (3 connections, 1 s: ideally 0, 1/3, 2/3 s), not all at one instant
        assert closes[-1] - closes[0] >= 0.3 * DRAIN_WINDOW, closes
        assert all(b - a >= 0.1 * DRAIN_WINDOW for a, b in itertools.pairwise(closes)), closes
        assert closes[-1] <= DRAIN_WINDOW + 1.0, closes
        # the process ended by itself, cleanly, within the deadline, and logged no error on the way
        assert status == 0, (status, exited_after, server.describe())
        log_lines = _json_lines(read_text(server.stderr_path))
        assert [e["msg"] for e in log_lines if e["msg"].startswith("received SIGTERM")], log_lines
        assert not [e for e in log_lines if e["level"] in ("error", "critical")], log_lines
        assert "Traceback" not in read_text(server.stderr_path)

        # --- readiness: 200 "ready" until SIGTERM, then 503 "draining" right away, never "ready" again
        before = [entry for entry in ready_log if entry[0] < term_at]  # answered before the signal was sent
        after = [entry for entry in ready_log if entry[0] >= term_at]
        assert before and all(e[1:] == (200, {"status": "ready"}) for e in before), before[-5:]
        print("readiness after SIGTERM:", [(round(t - term_at, 3), code, body) for t, code, body in after[:30]])
        draining = [i for i, e in enumerate(after) if e[1:] == (503, {"status": "draining"})]
        assert draining, f"no 503 draining among {len(after)} polls after SIGTERM: {after[:10]}"
        assert after[draining[0]][0] - term_at <= 0.5, after[: draining[0] + 1]
        assert not [e for e in after[draining[0]:] if e[1] == 200], after[:20]

        # --- sd_notify: READY=1 once, STATUS=…, WATCHDOG=1 repeatedly, STOPPING=1 at the drain
        states = notify.states()
        assert states.count("READY=1") == 1, states
        assert any(re.fullmatch(r"STATUS=\d+ connections", s) for s in states), states
        stopping = notify.times("STOPPING=1")
        assert len(stopping) == 1 and stopping[0] >= term_at, (stopping, term_at)
        assert notify.times("READY=1")[0] < stopping[0]
        pets = [t for t in notify.times("WATCHDOG=1") if t < stopping[0]]
        assert len(pets) >= 5, states
        assert pets[-1] - pets[0] >= 0.5, pets
        gaps = [b - a for a, b in itertools.pairwise(pets)]
        assert max(gaps) < 2 * WATCHDOG_USEC / 1e6, f"watchdog gap {max(gaps):.3f} s (WATCHDOG_USEC 0.2 s)"

    # --- a restarted daemon on the same data dir has every acked event exactly once, and nothing unknown
    async with running("restarted", tmp_path, {"PB_SERVER_DATA_DIR": str(data_dir)}) as again:
        assert again.server_key == server.server_key  # the identity key persisted
        for sender in senders:
            with trio.fail_after(T):
                async with connect(again.ws_url, sender.key, new_device_id()) as fresh:
                    replay = await fresh.replay(limit=1000)
            assert replay.full_resync is None, replay.full_resync
            stored = [e.event_id for e in replay.events]
            twice = [event_id for event_id, n in collections.Counter(stored).items() if n > 1]
            assert not twice, f"stored more than once: {twice}"
            assert all(e.device_id == sender.device_id for e in replay.events)
            assert sender.acked <= set(stored), f"acked but not stored: {sorted(sender.acked - set(stored))}"
            assert set(stored) <= set(sender.sent), f"stored but never sent: {sorted(set(stored) - set(sender.sent))}"
            # §5.3: an event the server processed was acked (the drain finishes the in-flight message first)
            assert set(stored) <= sender.acked, f"stored without an ack: {sorted(set(stored) - sender.acked)}"


# --- 2. the systemd unit ---------------------------------------------------------------------------------------
def _unit_directives(text: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = collections.defaultdict(list)
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        directives[key.strip()].append(value.strip())
    return directives


def test_systemd_unit_has_the_hardening_and_notify_settings() -> None:
    unit = _unit_directives(UNIT_FILE.read_text())

    def one(key: str) -> str:
        assert len(unit.get(key, [])) == 1, (key, unit.get(key))
        return unit[key][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert float(one("WatchdogSec")) > 0
    assert one("ExecStart").endswith(" serve")
    assert one("ExecStartPre").endswith(" check-config")
    assert "-HUP" in one("ExecReload") and "$MAINPID" in one("ExecReload")
    assert one("KillSignal") == "SIGTERM"
    # systemd must not SIGKILL before the drain's own hard deadline (default [drain] deadline = 30 s)
    assert float(one("TimeoutStopSec")) > 30
    assert one("DynamicUser") == "yes"
    assert one("StateDirectory") == "pocketbridge"
    assert one("ProtectSystem") == "strict"
    assert one("NoNewPrivileges") == "yes"
    # AF_UNIX is needed for $NOTIFY_SOCKET
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert one("SystemCallFilter") == "@system-service"
    assert one("CapabilityBoundingSet") == ""


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    executable = Path(sys.executable).parent / "pocketbridge"  # the venv's console script
    assert os.access(executable, os.X_OK), executable
    text = UNIT_FILE.read_text()
    assert "/opt/pocketbridge/bin/pocketbridge" in text
    unit = tmp_path / "pocketbridge.service"
    unit.write_text(text.replace("/opt/pocketbridge/bin/pocketbridge", str(executable)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == "", f"systemd-analyze verify warned:\n{output}"


# --- 3. SIGHUP reload --------------------------------------------------------------------------------------------
def _write_config(path: Path, data_dir: Path, *, max_devices: int, ws: str, extra: str = "") -> None:
    path.write_text(
        f"""
[server]
data_dir = "{data_dir}"

[listen]
ws = "{ws}"
http = "127.0.0.1:0"

[limits]
max_devices_per_user = {max_devices}
ws_connects_per_ip_per_minute = 10000
handshakes_per_ip_per_minute = 10000

[drain]
window = 0.2
deadline = 5

[log]
format = "json"
level = "info"
{extra}"""
    )


async def _second_device_refusal(url: str) -> tuple[int | None, str | None] | None:
    """Register a new user's first device, then try a second one; the close it got, or None if admitted."""
    key = DeviceKey.generate()
    with trio.fail_after(T):
        async with connect(url, key, new_device_id()):
            try:
                async with connect(url, key, new_device_id()):
                    return None
            except HandshakeRefused as refused:
                return (refused.code, refused.reason)


async def test_sighup_reloads_the_config_file(tmp_path: Path) -> None:
    data_dir, config = tmp_path / "data", tmp_path / "pocketbridge.toml"
    _write_config(config, data_dir, max_devices=5, ws="127.0.0.1:0")
    async with running("reload", tmp_path, {}, args=["--config", str(config)], base={}) as server:
        assert await _second_device_refusal(server.ws_url) is None  # the limit is 5

        # a reloadable change ([limits]) and one that needs a restart ([listen])
        mark = len(read_text(server.stderr_path))
        _write_config(config, data_dir, max_devices=1, ws="127.0.0.1:1")
        server.proc.send_signal(signal.SIGHUP)
        await wait_for_output(server, r"configuration reloaded; applied: limits", start=mark)
        await wait_for_output(server, r"\[listen\][^\n]*need[^\n]*restart", start=mark)
        assert await _second_device_refusal(server.ws_url) == (1008, "Device limit reached")
        lines = _json_lines(read_text(server.stderr_path)[mark:])
        restart = [e for e in lines if "[listen]" in e["msg"]]
        assert len(restart) == 1 and restart[0]["level"] == "warning", lines
        assert "[limits]" not in restart[0]["msg"], restart  # applied, so not listed as pending
        # [listen] was not applied: the WebSocket listener is where it was
        assert await _connect_outcome(server.ws_url) is not None

        # an invalid file is refused as a whole: the running configuration stays (limit 1), the problem is logged
        mark = len(read_text(server.stderr_path))
        _write_config(config, data_dir, max_devices=3, ws="127.0.0.1:1", extra='\n[ws]\nping_interval = "soon"\n')
        server.proc.send_signal(signal.SIGHUP)
        await wait_for_output(server, r"reload refused", start=mark)
        refused = [e for e in _json_lines(read_text(server.stderr_path)[mark:]) if "reload refused" in e["msg"]]
        assert refused and refused[0]["level"] == "error", refused
        assert "[ws] ping_interval" in refused[0]["msg"], refused
        assert await _second_device_refusal(server.ws_url) == (1008, "Device limit reached")
        assert server.proc.poll() is None, server.describe()
        async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
            assert (await http.get("/health/ready")).json() == {"status": "ready"}

        # still an orderly process: SIGTERM ends it with status 0
        server.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(server, 5) == 0, server.describe()


async def _session_refusal(url: str) -> tuple[int | None, str | None] | None:
    """Open (and close) one more session; the close it got, or None if it was admitted."""
    try:
        with trio.fail_after(T):
            async with connect(url, DeviceKey.generate(), new_device_id()):
                return None
    except Closed as refused:  # refused at the upgrade: the SDK sees the close when it sends client_hello
        return (refused.code, refused.reason)
    except ConnectionRejected as refused:  # refused at accept, before the upgrade (protocol.md §9)
        return (refused.status_code, "HTTP")


async def test_sighup_keeps_the_live_connection_counts(tmp_path: Path) -> None:
    # a reload changes limits, not the state they are measured on: the connections open from an address
    # still count against [limits] ws_connections_per_ip afterwards
    data_dir, config = tmp_path / "data", tmp_path / "pocketbridge.toml"
    over = (429, "HTTP")  # open connections per address are counted from accept: refused before the upgrade
    _write_config(config, data_dir, max_devices=5, ws="127.0.0.1:0", extra="")
    config.write_text(config.read_text().replace("[limits]\n", "[limits]\nws_connections_per_ip = 2\n"))
    async with running("reload-counts", tmp_path, {}, args=["--config", str(config)], base={}) as server:
        async with (
            connect(server.ws_url, DeviceKey.generate(), new_device_id()) as one,
            connect(server.ws_url, DeviceKey.generate(), new_device_id()) as two,
        ):
            assert await _session_refusal(server.ws_url) == over
            mark = len(read_text(server.stderr_path))
            config.write_text(config.read_text().replace("max_devices_per_user = 5", "max_devices_per_user = 4"))
            server.proc.send_signal(signal.SIGHUP)
            await wait_for_output(server, r"configuration reloaded; applied: limits", start=mark)
            assert await _session_refusal(server.ws_url) == over, "SIGHUP forgot the open connections"
            with trio.fail_after(T):
                await one.ping()
                await two.ping()
        with trio.fail_after(T):
            while (refusal := await _session_refusal(server.ws_url)) is not None:  # the count went back down
                await trio.sleep(0.05)
        assert refusal is None


# --- 4. no secrets in the logs of a real session ------------------------------------------------------------------
async def test_logs_of_a_full_session_carry_no_secrets(
    config_factory: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    nonces: list[str] = []  # every nonce the SDK makes (nonce_c, nonce_c2)

    def recording_token_hex(nbytes: int | None = None) -> str:
        import secrets

        value = secrets.token_hex(nbytes)
        nonces.append(value)
        return value

    monkeypatch.setattr(pocketbridge.client, "secrets", SimpleNamespace(token_hex=recording_token_hex))

    alice, phone = DeviceKey.generate(), DeviceKey.generate()
    # the laptop's short id starts with six digits (as about 6 % of random ids do): it must stay a short id,
    # not be taken for a pairing code
    laptop, phone_id = "123456ab" + new_device_id()[8:], new_device_id()
    payload = b"pocketbridge log probe: " + os.urandom(48)
    payload_b64 = base64.b64encode(payload).decode()
    signatures: list[str] = []
    event_ids: list[str] = []

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    setup_logging("debug", "json", stream=stream)
    try:
        async with run_daemon(e2e_config(config_factory)) as (daemon, running_daemon):
            url = running_daemon.ws_url
            server_key = running_daemon.identity.public_hex
            with trio.fail_after(T):
                async with connect(url, alice, laptop, device_name="Laptop") as a:
                    for _ in range(3):
                        ack = await a.send_event("clipboard:main", "clipboard:text", payload)
                        assert ack.status == "stored" and ack.event_id, ack
                        event_ids.append(ack.event_id)
                    async with connect(url, phone, phone_id, device_name="Phone") as p:
                        initiated = await a.initiate_pairing()
                        assert initiated["type"] == "pairing_initiated", initiated
                        code = initiated["payload"]["code"]
                        completed = await p.complete_pairing(code)
                        assert completed["type"] == "pairing_completed", completed
                        ack = await p.send_event("clipboard:main", "clipboard:text", payload)
                        assert ack.status == "stored" and ack.event_id, ack
                        event_ids.append(ack.event_id)
                        assert (await a.receive_event()).encrypted_payload == payload_b64
                    async with http_client(running_daemon) as http:
                        headers = pb1_headers(alice, laptop, "GET", "/api/devices")
                        signatures.append(headers["X-PB-Signature"])
                        response = await http.get("/api/devices", headers=headers)
                        assert response.status_code == 200, response.text
                        # failing: a signature over another path, and an unknown device
                        bad = pb1_headers(alice, laptop, "GET", "/api/presence")
                        signatures.append(bad["X-PB-Signature"])
                        response = await http.get("/api/devices", headers=bad)
                        assert response.status_code == 401, response.text
                        response = await signed(http, alice, laptop, "GET", f"/api/devices/{new_device_id()}")
                        assert response.status_code == 404, response.text
                        headers = pb1_headers(alice, laptop, "POST", "/api/auth/token")
                        signatures.append(headers["X-PB-Signature"])
                        response = await http.post("/api/auth/token", headers=headers)
                        assert response.status_code == 200, response.text
                        token = response.json()["token"]
                        assert (await bearer(http, token, "GET", "/api/devices")).status_code == 200
                        verify = await http.get("/api/auth/verify", headers={"Authorization": f"Bearer {token}"})
                        assert verify.json()["valid"] is True
                        assert (await bearer(http, token[:-4] + "AAAA", "GET", "/api/devices")).status_code == 401

                        # a request that fails inside the daemon with secrets in the exception text: logged
                        # (500, with the request's id), redacted
                        async def failing_get_profile(user_id: str) -> Any:
                            raise RuntimeError(
                                f"profile of {user_id} ({alice.public_hex}) failed: signature {signatures[0]}, "
                                f"token {token}, payload {payload_b64}, code {code}, device {laptop}"
                            )

                        assert daemon.gateway is not None
                        with monkeypatch.context() as patch:
                            patch.setattr(daemon.gateway.store, "get_profile", failing_get_profile)
                            response = await bearer(http, token, "GET", "/api/devices",
                                                    headers={"X-Request-ID": "ops-log-probe-1"})
                        assert response.status_code == 500, response.text
                        assert response.headers["X-Request-ID"] == "ops-log-probe-1"
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)

    output = stream.getvalue()
    lines = [json.loads(line) for line in output.splitlines()]
    assert lines, "nothing was logged"
    for entry in lines:
        assert {"ts", "level", "logger", "id", "msg"} <= set(entry) <= {"ts", "level", "logger", "id", "msg", "exc"}
    assert len(nonces) >= 4, nonces
    secrets_to_find = {
        "alice's public key": alice.public_hex,
        "the phone's public key": phone.public_hex,
        "the server's public key": server_key,
        "the bearer token": token,
        "the bearer token's signature": token.rsplit(".", 1)[1],
        "the payload (base64)": payload_b64,
        "the laptop's device id": laptop,
        "the phone's device id": phone_id,
        **{f"signature #{i}": sig for i, sig in enumerate(signatures)},
        **{f"nonce #{i}": nonce for i, nonce in enumerate(nonces)},
        **{f"event id #{i}": event_id for i, event_id in enumerate(event_ids)},
    }
    lowered = output.lower()
    leaked = [name for name, value in secrets_to_find.items() if value.lower() in lowered]
    assert not leaked, f"in the logs: {leaked}"
    assert re.search(rf"(?<!\d){code}(?!\d)", output) is None, "the pairing code is in the logs"
    assert re.search(r"[0-9a-fA-F]{32}", output) is None, "a long hex string is in the logs"
    # ids are shortened to 8 characters, and the connection's lines carry its id
    established = [e for e in lines if re.search(rf"session established for device {laptop[:8]}(?![0-9a-f-])", e["msg"])]
    assert established, [e["msg"] for e in lines if "session" in e["msg"]]
    for entry in [e for e in lines if e["msg"].startswith("connection ")]:
        assert entry["id"] == "ws:" + entry["msg"].split()[1].rstrip(":"), entry
    assert len({e["id"] for e in lines if re.fullmatch(r"ws:[0-9a-f]{8}", e["id"])}) >= 2, {e["id"] for e in lines}
    failed = [e for e in lines if e["msg"] == "request failed: RuntimeError"]
    assert len(failed) == 1, [e for e in lines if e["level"] == "error"]
    assert failed[0]["id"] == "ops-log-probe-1", failed  # the request's id is on its log line
    assert "RuntimeError: profile of " in failed[0].get("exc", ""), failed  # the exception text is there, redacted


# --- 5. the audit trail ------------------------------------------------------------------------------------------
ADMIN_KEY = "ops-test-admin-key-" + "x" * 24


async def test_audit_trail_lists_security_actions_newest_first(config_factory: Callable[..., Config]) -> None:
    config = e2e_config(
        config_factory, admin={"api_key": ADMIN_KEY}, http={"token_requests_per_device_per_minute": 1}
    )
    alice, phone, mallory = DeviceKey.generate(), DeviceKey.generate(), DeviceKey.generate()
    laptop, phone_id = new_device_id(), new_device_id()
    async with run_daemon(config) as (_, running_daemon):
        url = running_daemon.ws_url
        admin = {"X-Admin-API-Key": ADMIN_KEY}
        with trio.fail_after(T):
            async with connect(url, alice, laptop) as a:  # device_registered
                with pytest.raises(HandshakeRefused) as refused:  # handshake_refused
                    async with connect(url, mallory, laptop):
                        pass
                assert (refused.value.code, refused.value.reason) == (1008, "Device key mismatch")
                async with connect(url, phone, phone_id) as p:  # device_registered
                    code = (await a.initiate_pairing())["payload"]["code"]
                    assert (await p.complete_pairing(code))["type"] == "pairing_completed"  # device_paired
            async with http_client(running_daemon) as http:
                path = f"/api/devices/{phone_id}"
                response = await signed(http, alice, laptop, "POST", f"{path}/rename", {"device_name": "Phone"})
                assert response.status_code == 200, response.text  # device_renamed
                response = await signed(http, alice, laptop, "DELETE", path)
                assert response.status_code == 200, response.text  # device_revoked
                response = await http.post("/admin/unrevoke-device", json={"deviceId": phone_id}, headers=admin)
                assert response.status_code == 200, response.text  # device_unrevoked
                assert (await signed(http, alice, laptop, "POST", "/api/auth/token")).status_code == 200
                response = await signed(http, alice, laptop, "POST", "/api/auth/token")
                assert response.status_code == 429, response.text  # rate_limited
                response = await http.get("/admin/audit", headers={"X-Admin-API-Key": "wrong-" + ADMIN_KEY})
                assert response.status_code == 401, response.text  # admin_auth_failed
                response = await signed(http, alice, laptop, "DELETE", "/api/user")
                assert response.status_code == 200, response.text  # account_deleted

                # written with the store's next batch (at least once a second): poll, bounded
                records: list[dict[str, Any]] = []
                with trio.fail_after(5):
                    while not records or records[0]["action"] != "account_deleted":
                        await trio.sleep(0.25)
                        response = await http.get("/admin/audit", params={"limit": "50"}, headers=admin)
                        assert response.status_code == 200, response.text
                        assert set(response.json()) == {"records"}
                        records = response.json()["records"]

    # full ids: an administrator acts on what the trail shows (revoke needs the whole device id)
    a8, p8, alice8, phone8 = laptop, phone_id, alice.public_hex, phone.public_hex
    expected = [  # (action, actor, target, detail), newest first; None = not checked
        ("account_deleted", a8, alice8, None),
        ("admin_auth_failed", None, None, "/admin/audit"),
        ("rate_limited", a8, None, "http_token_requests"),
        ("device_unrevoked", "admin", p8, None),
        ("device_revoked", a8, p8, "Device has been removed by user"),
        ("device_renamed", a8, p8, None),
        ("device_paired", p8, alice8, None),
        ("device_registered", p8, phone8, None),
        ("handshake_refused", a8, None, "Device key mismatch"),
        ("device_registered", a8, alice8, None),
    ]
    mine = records[: len(expected)]  # a fresh store, or (PostgreSQL, shared per session) the newest records
    for record in mine:
        assert set(record) == {"at", "action", "actor", "target", "peer", "detail"}, record
    got = [(r["action"], r["actor"], r["target"], r["detail"] if e[3] is not None else None)
           for r, e in zip(mine, expected)]
    assert got == expected, json.dumps(records[: len(expected) + 3], indent=1)
    ats = [r["at"] for r in mine]
    assert ats == sorted(ats, reverse=True), ats
    for record in mine:
        assert record["peer"] == "127.0.0.1", record
    dumped = json.dumps(records)
    assert mallory.public_hex not in dumped  # a refused handshake records the device it claimed, not its key
