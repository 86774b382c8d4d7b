"""The audit trail's bound on refusals (one row per client and limit per minute, then a counted summary)."""

from __future__ import annotations

from pocketbridge.audit import AuditThrottle


def row(action: str, *, actor: str | None = None, target: str | None = None, peer: str | None = "198.51.100.7",
        detail: str | None = "limit") -> tuple[object, ...]:
    return (1_000, action, actor, target, peer, detail)


def test_repeated_refusals_write_one_row_then_a_summary() -> None:
    t = AuditThrottle(window=60, max_keys=100)
    written = [t.admit(row("rate_limited"), now=float(i) / 100) for i in range(500)]
    assert written.count(True) == 1 and written[0]
    assert t.sweep(now=30.0) == []  # the window is still open
    (summary,) = t.sweep(now=60.0)
    assert summary[1] == "rate_limited" and summary[4] == "198.51.100.7"
    assert summary[5] == "limit; 499 more refused within 60 s"
    assert t.admit(row("rate_limited"), now=61.0)  # a new window writes again


def test_keys_are_per_client_and_limit() -> None:
    t = AuditThrottle()
    assert t.admit(row("rate_limited", peer="198.51.100.1"), 0)
    assert t.admit(row("rate_limited", peer="198.51.100.2"), 0)
    assert t.admit(row("rate_limited", peer="198.51.100.1", detail="other"), 0)
    # a user's limit is keyed on the user, whatever address it comes from
    assert t.admit(row("rate_limited", target="user-a", peer="198.51.100.1", detail="events_per_user"), 0)
    assert not t.admit(row("rate_limited", target="user-a", peer="198.51.100.9", detail="events_per_user"), 0)
    # a refused handshake is keyed on the address: a client cannot escape by claiming new device ids
    assert t.admit(row("handshake_refused", actor="device-1", detail="Invalid client signature"), 0)
    assert not t.admit(row("handshake_refused", actor="device-2", detail="Invalid client signature"), 0)


def test_other_actions_are_never_throttled() -> None:
    t = AuditThrottle()
    assert all(t.admit(row("device_revoked"), 0) for _ in range(10))


def test_the_number_of_open_windows_is_bounded() -> None:
    t = AuditThrottle(max_keys=10)
    assert sum(t.admit(row("rate_limited", peer=f"198.51.100.{i}"), 0) for i in range(50)) == 10
    assert t.suppressed == 40
    assert len(t.sweep(now=100.0)) == 0 and t.admit(row("rate_limited", peer="198.51.100.49"), 100.0)
