"""`pocketbridge backup` copies the embedded store while the daemon serves (consistent, integrity-checked,
mode 0600), and the documented restore brings every event of the backup back (docs/operations.md)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import trio

from pocketbridge.client import DeviceKey, connect, new_device_id
from tests.conftest import make_config, run_daemon


def run_backup(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PB_")}
    env["PB_SERVER_DATA_DIR"] = str(data)
    return subprocess.run([sys.executable, "-m", "pocketbridge", "backup", "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=60)


async def test_backup_while_serving_then_restore(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "backups" / "pocketbridge.db"
    out.parent.mkdir()
    config = make_config(data, limits={"events_per_user_per_minute": 100_000, "event_burst_per_user": 100_000})
    key, device = DeviceKey.generate(), new_device_id()
    before: list[str] = []
    with trio.fail_after(90):
        async with run_daemon(config) as (_, running), connect(running.ws_url, key, device) as a:
            for i in range(200):
                before.append((await a.send_event("notes:main", "note:text", b"before %d" % i)).event_id or "")
            # the backup runs while A keeps writing
            result: list[subprocess.CompletedProcess[str]] = []
            async with trio.open_nursery() as nursery:
                async def backup() -> None:
                    result.append(await trio.to_thread.run_sync(run_backup, data, out))
                nursery.start_soon(backup)
                while not result:
                    await a.send_event("notes:main", "note:text", b"during")
            assert result[0].returncode == 0, result[0].stderr
            assert "integrity ok" in result[0].stdout and "identity key" in result[0].stdout
            after = (await a.send_event("notes:main", "note:text", b"after the backup")).event_id
            again = run_backup(data, out)
            assert again.returncode == 1 and "exists" in again.stderr  # never replaced unasked
        assert stat.S_IMODE(out.stat().st_mode) == 0o600

        # restore as documented: stopped daemon, the -wal/-shm files removed, the copy in place
        for suffix in ("-wal", "-shm"):
            Path(f"{config.sqlite_path()}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(out, config.sqlite_path())
        async with run_daemon(config) as (_, running), connect(running.ws_url, key, new_device_id()) as b:
            replayed = {e.event_id for e in (await b.replay()).events}
    assert set(before) <= replayed, "an event stored before the backup is missing after the restore"
    assert after not in replayed  # the restore takes the relay back to the backup


def test_backup_of_a_postgres_deployment_explains_pg_dump(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PB_")}
    env.update(PB_STORAGE_BACKEND="postgres", PB_STORAGE_DSN="postgresql://pb:secret@db.example/pb")
    done = subprocess.run([sys.executable, "-m", "pocketbridge", "backup", "--out", str(tmp_path / "x")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "pg_dump" in done.stdout and "secret" not in done.stdout
