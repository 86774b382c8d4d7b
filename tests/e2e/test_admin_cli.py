"""`pocketbridge admin` against a real daemon: users, devices (revoked ones included, full ids), revoke,
unrevoke, audit --since; the key from PB_ADMIN_API_KEY or a 0600 file, never the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from pocketbridge.client import Closed, DeviceKey, connect, new_device_id
from tests.conftest import make_config, run_daemon

KEY = "a" * 40
pytestmark = pytest.mark.slow


def admin(url: str, *args: str, key: str | None = KEY, key_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PB_")}
    if key is not None:
        env["PB_ADMIN_API_KEY"] = key
    extra = ["--key-file", str(key_file)] if key_file else []
    return subprocess.run([sys.executable, "-m", "pocketbridge", "admin", *args, "--url", url, *extra], env=env,
                          capture_output=True, text=True, timeout=60)


async def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: admin(*args, **kw))  # type: ignore[arg-type]


async def test_admin_commands(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", admin={"api_key": KEY})
    alice = DeviceKey.generate()
    laptop, phone = new_device_id(), new_device_id()
    with trio.fail_after(90):
        async with run_daemon(config) as (_, running):
            url = running.http_url
            async with connect(running.ws_url, alice, laptop, device_name="Laptop"):
                pass
            async with connect(running.ws_url, alice, phone, device_name="Phone") as p:
                users = await run(url, "users", "--json")
                assert users.returncode == 0, users.stderr
                mine = [u for u in json.loads(users.stdout)["users"] if u["user_id"] == alice.public_hex]
                assert mine and mine[0]["devices"] == 2 and mine[0]["revoked_devices"] == 0
                table = await run(url, "users")
                assert alice.public_hex in table.stdout and "LAST ACTIVITY" in table.stdout

                done = await run(url, "revoke", phone, "--reason", "Lost on a train")
                assert done.returncode == 0, done.stderr
                with pytest.raises(Closed), trio.fail_after(10):
                    await p.receive_event()
            listed = json.loads((await run(url, "devices", alice.public_hex, "--json")).stdout)["devices"]
            assert {d["device_id"]: d["revoked_at"] is not None for d in listed} == {laptop: False, phone: True}
            table = (await run(url, "devices", alice.public_hex)).stdout
            assert phone in table and "revoked" in table  # the full id, to act on

            assert (await run(url, "unrevoke", phone)).returncode == 0
            async with connect(running.ws_url, alice, phone):
                pass

            await trio.sleep(1.2)  # audit rows are written with the store's next flush
            audit = await run(url, "audit", "--since", "1h", "--json")
            records = json.loads(audit.stdout)["records"]
            revoked = [r for r in records if r["action"] == "device_revoked"]
            assert revoked and revoked[0]["target"] == phone and revoked[0]["detail"] == "Lost on a train"
            assert any(r["action"] == "device_unrevoked" and r["target"] == phone for r in records)

            # the key: never on the command line, from the environment or a private file
            missing = await run(url, "users", key=None)
            assert missing.returncode == 1 and "PB_ADMIN_API_KEY" in missing.stderr
            key_file = tmp_path / "admin.key"
            key_file.write_text(KEY + "\n")
            key_file.chmod(0o644)
            loose = await run(url, "users", key=None, key_file=key_file)
            assert loose.returncode == 1 and "chmod 600" in loose.stderr
            key_file.chmod(0o600)
            assert (await run(url, "users", key=None, key_file=key_file)).returncode == 0
            wrong = await run(url, "users", key="b" * 40)
            assert wrong.returncode == 1 and "401" in wrong.stderr
