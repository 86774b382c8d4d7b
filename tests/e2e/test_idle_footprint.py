"""What an idle connection and the embedded default cost, guarded without timing (the figures are in
``pocketbridge bench --scenario memory``): the tasks a handshaken idle connection runs, and the modules the
daemon on the embedded default (SQLite, in-process bus) never loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import trio
import trio.testing

from pocketbridge.client import DeviceKey, connect, new_device_id
from tests.conftest import make_config, run_daemon

IDLE = 3


def connection_tasks() -> list[int]:
    """For each connection the gateway serves: its handler task and every task below it."""

    def below(task: trio.lowlevel.Task) -> int:
        return 1 + sum(below(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    def find(task: trio.lowlevel.Task, name: str) -> list[trio.lowlevel.Task]:
        if task.name.endswith(name):
            return [task]
        return [found for nursery in task.child_nurseries for child in nursery.child_tasks
                for found in find(child, name)]

    (gateway,) = find(trio.lowlevel.current_root_task(), "gateway.server.serve_gateway")
    return [below(handler) for handler in find(gateway, "_run_handler")]  # trio.serve_listeners' handler tasks


async def test_a_handshaken_idle_connection_runs_two_tasks(tmp_path: Path) -> None:
    """The handler (message loop, waiting for a message) and the reader (waiting for bytes): no writer while
    nothing is queued, no timer task (the session clock serves every session)."""
    config = make_config(tmp_path / "data", ws={"ping_interval": 3600, "pong_timeout": 3600})
    async with run_daemon(config) as (_, running), trio.open_nursery() as clients:
        opened = 0
        all_open = trio.Event()

        async def hold() -> None:
            nonlocal opened
            async with connect(running.ws_url, DeviceKey.generate(), new_device_id()) as client:
                await client.ping()  # a full round trip: the session is live
                opened += 1
                if opened == IDLE:
                    all_open.set()
                await trio.sleep_forever()

        with trio.fail_after(30):
            for _ in range(IDLE):
                clients.start_soon(hold)
            await all_open.wait()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert connection_tasks() == [2] * IDLE
        clients.cancel_scope.cancel()


SCRIPT = textwrap.dedent("""
    import sys, trio
    import pocketbridge.cli  # what `pocketbridge serve` imports
    from pocketbridge.client import DeviceKey, connect, new_device_id
    from tests.conftest import make_config, run_daemon

    async def main():
        with trio.fail_after(30):
            async with run_daemon(make_config(sys.argv[1])) as (_, running):
                async with connect(running.ws_url, DeviceKey.generate(), new_device_id()) as client:
                    await client.ping()
        print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))

    trio.run(main)
""")


def test_the_embedded_default_loads_no_postgres_redis_or_tracing(tmp_path: Path) -> None:
    """A daemon on the embedded default, with a session served, has not imported psycopg, redis or
    OpenTelemetry (each is imported only where it is configured), the command line included."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data")],
        cwd=root, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = set(done.stdout.split())
    assert "pocketbridge" in loaded
    assert loaded.isdisjoint({"psycopg", "psycopg_pool", "redis", "opentelemetry"}), loaded & {
        "psycopg", "psycopg_pool", "redis", "opentelemetry"}
