"""Admission of TCP connections on the WebSocket listener, before any byte is read (protocol.md §9).

A connection counts against its address from ``accept`` (not from the upgrade, so silent sockets count
too), and against the process-wide cap on connections that have not finished the handshake: when that
cap is reached the oldest of them is shed to make room, so a flood of silent sockets cannot keep real
clients out. Every WebSocket connection also takes one of the file descriptors set aside for the
listener (the soft RLIMIT_NOFILE less a reserve kept for the HTTP listener, the database and Redis).
No trio, no sockets: the listener drives it and it is tested on its own.
"""

from __future__ import annotations

import logging
import resource
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger("pocketbridge.gateway")

FD_RESERVE = 256  # descriptors kept for the HTTP listener, store and bus connections, files
MIN_WS_BUDGET = 64


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


def ws_fd_budget(soft_limit: int, reserve: int = FD_RESERVE) -> int:
    """How many WebSocket connections the descriptors allow, the reserve kept aside."""
    return max(MIN_WS_BUDGET, soft_limit - reserve)


class AcceptGate:
    """Counts every accepted WebSocket-listener connection until it ends.

    ``admit(token, shed)`` registers a new connection as pending (not yet past the handshake) and returns
    a refusal reason or None; ``shed`` is the callable that closes it if it is shed later. Call
    ``established(token)`` once its handshake succeeded and ``release(token)`` when it ends.
    """

    def __init__(self, max_pending: int, max_open: int) -> None:
        self.max_pending = max_pending
        self.max_open = max_open
        self.open = 0
        self.shed_count = 0
        self._pending: OrderedDict[object, Callable[[], None]] = OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def admit(self, token: object, shed: Callable[[], None]) -> str | None:
        if self.open >= self.max_open:
            return "file_descriptors"
        self.open += 1
        while len(self._pending) >= self.max_pending:
            _, close_oldest = self._pending.popitem(last=False)
            self.shed_count += 1
            close_oldest()
        self._pending[token] = shed
        return None

    def established(self, token: object) -> None:
        self._pending.pop(token, None)

    def release(self, token: object) -> None:
        self._pending.pop(token, None)
        self.open -= 1
