"""The audit trail: security-relevant actions with who/what/when/from where.

The trail is for administrators (``GET /admin/audit``, ``pocketbridge admin audit``) and keeps full device and
user ids, so an id read there can be acted on (``pocketbridge admin revoke DEVICE``). Logs shorten ids; the
trail never holds keys, signatures, codes or payloads.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs


class _Store(Protocol):
    def note_audit(
        self, at_ms: int, action: str, actor: str | None, target: str | None, peer: str | None, detail: str | None
    ) -> None: ...


class _Clock(Protocol):
    def now_ms(self) -> int: ...


@attrs.frozen
class Auditor:
    """Writes audit rows with the store's next batch; never blocks, never raises."""

    store: _Store
    clock: _Clock

    def __call__(
        self, action: str, *, actor: str | None = None, target: str | None = None, peer: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.store.note_audit(self.clock.now_ms(), action, actor, target, peer, detail)


class _Parts(Protocol):
    @property
    def store(self) -> Any: ...

    @property
    def clock(self) -> Any: ...


def audit(
    parts: _Parts,
    action: str,
    *,
    actor: str | None = None,
    target: str | None = None,
    peer: str | None = None,
    detail: str | None = None,
) -> None:
    """Record ``action`` for whoever holds a store and a clock (the gateway)."""
    Auditor(parts.store, parts.clock)(action, actor=actor, target=target, peer=peer, detail=detail)


# Refusals an attacker can repeat at will: each (action, address or user, limit) is written at most once per
# window; what is refused after that is counted and written as one summary row when the window ends.
THROTTLED = frozenset({"rate_limited", "handshake_refused", "admin_auth_failed"})
BY_PEER = frozenset({"handshake_refused", "admin_auth_failed"})  # the actor of these is whatever the client claims
THROTTLE_WINDOW = 60.0
MAX_THROTTLE_KEYS = 10_000

AuditRow = tuple[Any, ...]  # (at_ms, action, actor, target, peer, detail)


class AuditThrottle:
    """Bounds the audit rows one client can cause (``admit`` then ``sweep`` once a second)."""

    def __init__(self, window: float = THROTTLE_WINDOW, max_keys: int = MAX_THROTTLE_KEYS) -> None:
        self._window = window
        self._max_keys = max_keys
        self._open: dict[tuple[Any, ...], list[Any]] = {}  # key -> [window start, refused since, last row]
        self.suppressed = 0  # rows not written (counted in a summary row, or dropped when too many keys)

    def admit(self, row: AuditRow, now: float) -> bool:
        """True if ``row`` is to be written now; otherwise it is counted for the window's summary."""
        _, action, actor, target, peer, detail = row
        if action not in THROTTLED:
            return True
        subject = peer if action in BY_PEER else (target or actor or peer)
        key = (action, subject, detail)
        entry = self._open.get(key)
        if entry is not None:
            entry[1] += 1
            entry[2] = row
            self.suppressed += 1
            return False
        if len(self._open) >= self._max_keys:
            self.suppressed += 1
            return False
        self._open[key] = [now, 0, row]
        return True

    def sweep(self, now: float) -> list[AuditRow]:
        """Close the windows that ended: one summary row for each that refused more after its first row."""
        rows: list[AuditRow] = []
        for key, (started, count, last) in list(self._open.items()):
            if now - started >= self._window:
                del self._open[key]
                if count:
                    at_ms, action, actor, target, peer, detail = last
                    summary = f"{detail}; {count} more refused within {int(self._window)} s"
                    rows.append((at_ms, action, actor, target, peer, summary))
        return rows
