"""The audit trail: security-relevant actions with who/what/when/from where (ids shortened)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gateway.context import Gateway

SHORT = 8


def short(value: str | None) -> str | None:
    return value[:SHORT] if value else None


def audit(
    gw: Gateway,
    action: str,
    *,
    actor: str | None = None,
    target: str | None = None,
    peer: str | None = None,
    detail: str | None = None,
) -> None:
    """Record ``action`` (written with the store's next batch; never blocks, never raises)."""
    gw.store.note_audit(gw.clock.now_ms(), action, short(actor), short(target), peer, detail)
