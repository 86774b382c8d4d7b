"""systemd integration without a package: sd_notify over the unix datagram socket, and the watchdog.

``READY=1`` is sent once both listeners are bound and the store is usable, ``STATUS=`` lines carry
connection counts, ``WATCHDOG=1`` comes from a trio task (so a stalled event loop stops it), and
``STOPPING=1`` marks the start of the drain. Without ``$NOTIFY_SOCKET`` everything here is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger("pocketbridge.systemd")

STATUS_INTERVAL = 10.0


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the service manager; False when there is none."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc.strerror or type(exc).__name__)
        return False


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Half the watchdog timeout systemd asked for (``WATCHDOG_USEC``), if it is meant for us."""
    env = env if env is not None else os.environ
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.1, int(usec) / 2_000_000)
    except ValueError:
        return None


async def run_watchdog(status: Callable[[], str]) -> None:
    """Pet the watchdog and report status while the event loop keeps turning."""
    interval = watchdog_interval()
    next_status = 0.0
    while True:
        now = trio.current_time()
        if now >= next_status:
            notify(f"STATUS={status()}")
            next_status = now + STATUS_INTERVAL
        if interval is not None:
            notify("WATCHDOG=1")
        await trio.sleep(min(interval or STATUS_INTERVAL, STATUS_INTERVAL))
