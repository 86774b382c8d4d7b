"""The ack queue of a session (pocketbridge.protocol.acks): answers leave in the order the events came,
whatever order the store answers in; bounded by its depth."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pocketbridge.errors import TRY_AGAIN
from pocketbridge.protocol.acks import AckQueue
from pocketbridge.protocol.delivery import Disconnect, Send


def test_answers_leave_in_order() -> None:
    q = AckQueue(4)
    a, b, c = q.push(1.0), q.push(2.0), q.push(3.0)
    assert q.full is False and len(q) == 3 and q.oldest() == 1.0
    assert q.answer(c, Send("c")) == []
    assert q.answer(b, Send("b")) == []
    assert q.oldest() == 1.0
    assert q.answer(a, Send("a")) == [Send("a"), Send("b"), Send("c")]
    assert len(q) == 0 and q.oldest() is None


def test_an_answer_known_at_once_waits_its_turn() -> None:
    q = AckQueue(4)
    a = q.push(1.0)
    q.push(2.0, Send("rejected"))
    assert q.answer(a, Disconnect(TRY_AGAIN)) == [Disconnect(TRY_AGAIN), Send("rejected")]


def test_bounded() -> None:
    q = AckQueue(2)
    q.push(0.0)
    q.push(0.0)
    assert q.full
    with pytest.raises(OverflowError):
        q.push(0.0)
    with pytest.raises(ValueError):
        AckQueue(0)


@given(st.permutations(range(12)))
def test_any_answer_order_gives_the_push_order(order: list[int]) -> None:
    q = AckQueue(12)
    entries = [q.push(float(i)) for i in range(12)]
    out: list[Send | Disconnect] = []
    for i in order:
        out += q.answer(entries[i], Send(str(i)))
        assert q.oldest() == (float(min(set(range(12)) - {int(s.wire) for s in out if isinstance(s, Send)}))
                              if len(out) < 12 else None)
    assert out == [Send(str(i)) for i in range(12)]
