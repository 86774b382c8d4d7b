"""`pocketbridge client init|register|api` against a real in-process daemon.

The CLI is synchronous (it runs its own trio loop for the WebSocket handshake and uses http.client for the
API), so the tests run it in a worker thread while the daemon serves in the test's trio loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from pocketbridge.cli import main
from pocketbridge.client import DeviceKey
from pocketbridge.client.cli import _body, default_identity_path
from pocketbridge.config import Config
from tests.conftest import run_daemon


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``pocketbridge client <argv>`` in this thread; (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["client", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


async def acli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The same from a trio test: in a worker thread, so the in-process daemon keeps serving."""
    with trio.fail_after(20):
        return await trio.to_thread.run_sync(lambda: cli(capsys, *argv))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


# --- init ---------------------------------------------------------------------------------------------------
def test_init_creates_private_file_and_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sub" / "device.json"
    rc, out, err = cli(capsys, "init", "--file", str(path), "--name", "Laptop", "--type", "desktop")
    assert rc == 0, err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = read(path)
    key = DeviceKey.from_seed(bytes.fromhex(data["seed"]))
    assert data["device_name"] == "Laptop" and data["device_type"] == "desktop" and "server_key" not in data
    assert data["device_id"] in out and key.public_hex in out
    assert data["seed"] not in out + err

    before = path.read_bytes()
    rc, out, err = cli(capsys, "init", "--file", str(path))
    assert rc == 1 and "--force" in err and "Traceback" not in err
    assert path.read_bytes() == before

    rc, _, err = cli(capsys, "init", "--file", str(path), "--force")
    assert rc == 0, err
    assert read(path)["device_id"] != json.loads(before)["device_id"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_default_path_follows_xdg_config_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert default_identity_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/pocketbridge/device.json")
    assert default_identity_path({}) == Path.home() / ".config" / "pocketbridge" / "device.json"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    rc, _, err = cli(capsys, "init")
    assert rc == 0, err
    assert (tmp_path / "cfg" / "pocketbridge" / "device.json").is_file()


def test_body_is_compact_json_as_signed() -> None:
    body = _body('{ "device_name" : "Work laptop" }')
    assert body == b'{"device_name":"Work laptop"}'
    # the body of the rename vector in protocol.md §10.2
    assert hashlib.sha256(body).hexdigest() == "4954fdc2629579dbe10ef9d49b34665a0dc510a74fc1145ca9d1130309e612be"
    assert _body(None) == b""


# --- register and api against a daemon ----------------------------------------------------------------------
async def test_register_then_signed_api_requests(
    tmp_path: Path, config_factory: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "device.json"
    assert cli(capsys, "init", "--file", str(path), "--name", "Laptop", "--type", "desktop")[0] == 0
    device_id = read(path)["device_id"]
    async with run_daemon(config_factory()) as (_, running):
        rc, out, err = await acli(capsys, "register", "--url", running.ws_url, "--file", str(path))
        assert rc == 0, err
        server_key = running.identity.public_hex
        assert read(path)["server_key"] == server_key
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert device_id in out and server_key[:16] in out and running.identity.fingerprint() in out

        rc, out, err = await acli(capsys, "register", "--url", running.ws_url, "--file", str(path))
        assert rc == 0 and "matches the pinned key" in out, err

        api = ("--file", str(path), "--base-url", running.http_url)
        rc, out, err = await acli(capsys, "api", "GET", "/api/devices", *api)
        assert rc == 0 and "200" in err, err
        listing = json.loads(out)
        assert [(d["device_id"], d["is_current"], d["device_name"]) for d in listing["devices"]] == [
            (device_id, True, "Laptop")
        ]

        rc, out, err = await acli(
            capsys, "api", "POST", f"/api/devices/{device_id}/rename", "--data", '{"device_name": "Work laptop"}', *api
        )
        assert rc == 0, err
        assert json.loads(out) == {"success": True, "device_id": device_id, "device_name": "Work laptop"}

        body_file = tmp_path / "rename.json"
        body_file.write_text('{"device_name": "Büro"}\n', encoding="utf-8")
        rename = f"/api/devices/{device_id}/rename"
        rc, out, err = await acli(capsys, "api", "post", rename, "--data", f"@{body_file}", *api)
        assert rc == 0, err
        rc, out, err = await acli(capsys, "api", "GET", f"/api/v1/devices/{device_id}", *api)
        assert rc == 0 and json.loads(out)["device_name"] == "Büro", err

        rc, out, err = await acli(capsys, "api", "GET", "/api/events/files?limit=10&offset=0", "--bearer", *api)
        assert rc == 0, err
        assert json.loads(out)["pagination"]["limit"] == 10

        rc, out, err = await acli(capsys, "api", "GET", "/api/devices/00000000-0000-4000-8000-000000000000", *api)
        assert rc == 1 and "404" in err
        assert json.loads(out)["code"] == "DEVICE_NOT_FOUND"


async def test_changed_server_key_is_refused(
    tmp_path: Path, config_factory: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "device.json"
    assert cli(capsys, "init", "--file", str(path))[0] == 0
    data = read(path)
    other = DeviceKey.generate().public_hex
    path.write_text(json.dumps({**data, "server_key": other}))
    path.chmod(0o600)
    before = path.read_bytes()
    async with run_daemon(config_factory()) as (_, running):
        rc, out, err = await acli(capsys, "register", "--url", running.ws_url, "--file", str(path))
        assert rc == 1 and out == ""
        assert "pinned" in err and other[:16] in err and '"server_key"' in err and "Traceback" not in err
        assert path.read_bytes() == before
        # the device never got as far as client_auth, so it does not exist on the server
        api = ("--file", str(path), "--base-url", running.http_url)
        rc, out, err = await acli(capsys, "api", "GET", "/api/devices", *api)
        assert rc == 1 and json.loads(out)["code"] == "INVALID_SIGNATURE"


async def test_unregistered_device_gets_401_with_a_hint(
    tmp_path: Path, config_factory: Callable[..., Config], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "device.json"
    assert cli(capsys, "init", "--file", str(path))[0] == 0
    async with run_daemon(config_factory()) as (_, running):
        api = ("--file", str(path), "--base-url", running.http_url)
        rc, _, err = await acli(capsys, "api", "GET", "/api/devices", *api)
    assert rc == 1 and "401" in err and "client register" in err


# --- failures without a daemon ------------------------------------------------------------------------------
def test_unreachable_server_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "device.json"
    assert cli(capsys, "init", "--file", str(path))[0] == 0
    port = closed_port()
    base_url = f"http://127.0.0.1:{port}"
    rc, out, err = cli(capsys, "api", "GET", "/api/devices", "--file", str(path), "--base-url", base_url)
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("pocketbridge client: cannot reach") and "refused" in err

    rc, out, err = cli(capsys, "register", "--file", str(path), "--url", f"ws://127.0.0.1:{port}/ws", "--timeout", "5")
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and err.startswith("pocketbridge client: cannot reach") and "refused" in err
    assert "server_key" not in read(path)


def test_missing_identity_file_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.json")
    for argv in (("api", "GET", "/api/devices", "--file", missing), ("register", "--file", missing)):
        rc, out, err = cli(capsys, *argv)
        assert (rc, out) == (1, "") and "client init" in err and err.count("\n") == 1

    path = tmp_path / "device.json"
    assert cli(capsys, "init", "--file", str(path))[0] == 0
    for argv, words in (
        (("api", "GET", "api/devices"), "must start with '/'"),
        (("api", "GET", "http://127.0.0.1:3002/api/devices"), "path only"),
        (("api", "POST", "/api/user/profile", "--data", "{nope"), "not valid JSON"),
        (("api", "POST", "/api/user/profile", "--data", f"@{tmp_path / 'missing.json'}"), "cannot read"),
        (("register", "--url", "http://127.0.0.1:3001/ws"), "ws://"),
    ):
        rc, out, err = cli(capsys, *argv, "--file", str(path))
        assert (rc, out) == (1, "") and words in err, (argv, err)


def test_console_entry_point_reports_unreachable_server_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "device.json"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path)}
    base = [sys.executable, "-m", "pocketbridge", "client"]
    init = subprocess.run(
        [*base, "init", "--file", str(path)], capture_output=True, text=True, timeout=30, env=env, check=False
    )
    assert init.returncode == 0, init.stderr
    api = subprocess.run(
        [*base, "api", "GET", "/api/devices", "--file", str(path), "--base-url", f"http://127.0.0.1:{closed_port()}"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert api.returncode == 1 and api.stdout == ""
    assert api.stderr.count("\n") == 1 and "cannot reach" in api.stderr and "Traceback" not in api.stderr


# --- remembered URLs and pairing ----------------------------------------------------------------------------
async def test_register_remembers_the_urls_and_pair_joins_a_second_device(
    tmp_path: Path, config_factory: Callable[..., Config], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    laptop, phone = tmp_path / "laptop.json", tmp_path / "phone.json"
    async with run_daemon(config_factory()) as (_, running):
        monkeypatch.setenv("PB_CLIENT_URL", running.ws_url)  # the URL from the environment, not the command line
        rc, out, _ = cli(capsys, "init", "--file", str(laptop), "--name", "Laptop")
        assert rc == 0 and f"--url {running.ws_url}" in out
        rc, out, err = await acli(capsys, "register", "--file", str(laptop), "--base-url", running.http_url)
        assert rc == 0, err
        assert (read(laptop)["ws_url"], read(laptop)["base_url"]) == (running.ws_url, running.http_url)
        monkeypatch.delenv("PB_CLIENT_URL")
        rc, out, err = await acli(capsys, "api", "GET", "/api/devices", "--file", str(laptop))  # no --base-url
        assert rc == 0 and len(json.loads(out)["devices"]) == 1, err

        assert cli(capsys, "init", "--file", str(phone), "--name", "Phone")[0] == 0
        rc, _, err = await acli(capsys, "register", "--file", str(phone), "--url", running.ws_url,
                                "--base-url", running.http_url)
        assert rc == 0, err

        # the laptop shows a code and waits (a real process: its first line is read as a person would)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PB_")}
        initiator = await trio.lowlevel.open_process(
            [sys.executable, "-m", "pocketbridge", "client", "pair", "--file", str(laptop)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        try:
            shown = b""
            with trio.fail_after(20):
                while b"\n" not in shown:
                    shown += await initiator.stdout.receive_some(4096)  # type: ignore[union-attr]
            code = shown.split(b"pairing code: ", 1)[1][:6].decode()
            rc, out, err = await acli(capsys, "pair", code, "--file", str(phone))
            assert rc == 0 and "paired" in out, err
            with trio.fail_after(20):
                assert await initiator.wait() == 0
                rest = b""
                while chunk := await initiator.stdout.receive_some(4096):  # type: ignore[union-attr]
                    rest += chunk
            assert b"Phone" in rest and b"joined this account" in rest, rest
        finally:
            with trio.CancelScope(shield=True):
                if initiator.returncode is None:
                    initiator.kill()
                    await initiator.wait()
        rc, out, err = await acli(capsys, "api", "GET", "/api/devices", "--file", str(laptop))
        assert {d["device_name"] for d in json.loads(out)["devices"]} == {"Laptop", "Phone"}

        rc, _, err = await acli(capsys, "pair", "000000", "--file", str(phone))
        assert rc == 1 and "pairing failed" in err

