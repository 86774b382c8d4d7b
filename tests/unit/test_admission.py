"""The accept-time gate: descriptors, the cap on connections not yet past the handshake, shedding."""

from __future__ import annotations

import resource

from pocketbridge.gateway.admission import AcceptGate, raise_fd_limit, ws_fd_budget


def test_pending_cap_sheds_the_oldest() -> None:
    gate = AcceptGate(max_pending=3, max_open=100)
    shed: list[int] = []
    for i in range(5):
        assert gate.admit(i, lambda i=i: shed.append(i)) is None
    assert shed == [0, 1] and gate.pending == 3 and gate.open == 5 and gate.shed_count == 2
    gate.established(2)  # past the handshake: never shed
    for i in range(5, 8):
        assert gate.admit(i, lambda i=i: shed.append(i)) is None
    assert shed == [0, 1, 3, 4]  # 5 fit in the slot 2 left
    for i in range(8):
        gate.release(i)
    assert gate.open == 0 and gate.pending == 0


def test_descriptor_budget_refuses_new_connections() -> None:
    gate = AcceptGate(max_pending=10, max_open=2)
    assert gate.admit("a", lambda: None) is None
    assert gate.admit("b", lambda: None) is None
    assert gate.admit("c", lambda: None) == "file_descriptors"
    gate.release("a")
    assert gate.admit("c", lambda: None) is None


def test_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = raise_fd_limit()
    assert (soft, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == hard or hard == resource.RLIM_INFINITY
    assert ws_fd_budget(1024) == 768 and ws_fd_budget(100) == 64
