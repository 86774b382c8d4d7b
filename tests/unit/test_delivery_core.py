"""The pure delivery core (``pocketbridge.protocol.delivery``): examples, then a stateful model test.

No sockets, no store, no trio: the store is a dict, the bus a list of notices that arrive in any order or
not at all, the client a queue of frames it receives a prefix of. The model checks, under random
interleavings of commits, notices, gap reads, acks (both forms), replay requests and pages, store failures,
time, purges and reconnects (a new core from the persisted cursor): live delivery is above H, in order and
at most once per connection, and exactly once when everything has arrived; replay pages hold only (start, H];
C never decreases; nothing at or below C (the core's or the persisted one) is lost, i.e. each such event was
own, expired, purged, given up by a full resync, or received by the client before it sent a message.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pocketbridge.bus import EventNotice
from pocketbridge.config import ReplayConfig
from pocketbridge.errors import HEARTBEAT_TIMEOUT, SESSION_EXPIRED, TRY_AGAIN
from pocketbridge.metrics import Metrics
from pocketbridge.protocol.delivery import (
    FILL_GAPS,
    METRICS,
    NOTE_SEEN,
    PING,
    REPLAY_FAILED,
    Count,
    CountPending,
    Delivery,
    Disconnect,
    NoteCursor,
    ReadEvents,
    ReadPage,
    Send,
    SessionTimers,
    event_message,
)
from pocketbridge.protocol.envelope import Message
from pocketbridge.protocol.replay import make_token
from pocketbridge.store import Page, StoredEvent

U = "u" * 64
U2 = "v" * 64
ME = "dddddddd-0000-4000-8000-000000000000"
X = "aaaaaaaa-0000-4000-8000-000000000000"
Y = "bbbbbbbb-0000-4000-8000-000000000000"
KEY = bytes(range(32))
T0 = 1_760_000_000_000
CFG = ReplayConfig(default_page_size=3, max_page_size=5, full_resync_threshold=12)
MODEL_CFG = ReplayConfig(default_page_size=2, max_page_size=3, full_resync_threshold=10)


def stored(
    seq: int, sender: str = X, device_seq: int | None = None, ttl: int | None = None, user: str = U
) -> StoredEvent:
    return StoredEvent(
        user_id=user, server_seq=seq, event_id=f"0000000{seq}-e", device_id=sender,
        device_seq=seq if device_seq is None else device_seq, stream_id="s", stream_seq=seq, type="t",
        encrypted_payload="AA==", payload_size=1, ttl=ttl, created_at=T0,
    )


def notice(e: StoredEvent, wire: bool = True) -> EventNotice:
    return EventNotice(e.user_id, e.server_seq, e.device_id, e.event_id, e.device_seq, e.ttl,
                       event_message(e) if wire else "", e.created_at)


def core(cursor: int = 0, head: int | None = 0, max_tracked: int = 10_000) -> Delivery:
    d = Delivery(U, ME, cursor, max_tracked=max_tracked, token_key=KEY)
    if head is not None:
        d.start(head)
    return d


def replay_msg(**params: Any) -> Message:
    payload = {"type": "replay_request", **params}
    return Message("replay_request", payload, {"type": "replay_request", "payload": payload})


def frame(out: Any) -> Any:
    assert isinstance(out, Send)
    return json.loads(out.wire)


# --- live delivery -----------------------------------------------------------------------------------
def test_in_order_notice_returns_its_own_frame_and_ack_moves_the_cursor() -> None:
    d = core()
    e = stored(1, device_seq=7)
    n = notice(e)
    assert d.notice(n, T0) is n.wire  # nothing wrapped, nothing encoded again
    assert d.last == 1 and d.cursor == 0
    assert d.ack({"device_seq": 7, "event_id": e.event_id.upper()}) == NoteCursor(1)
    assert d.ack({"device_seq": 7, "event_id": e.event_id}) is None  # acked once
    assert d.cursor == 1


def test_own_and_expired_events_are_skipped_and_counted_done() -> None:
    d = core()
    assert d.notice(notice(stored(1, sender=ME)), T0) == NoteCursor(1)
    assert d.notice(notice(stored(2, ttl=T0)), T0) == NoteCursor(2)  # ttl <= now: expired
    assert d.notice(notice(stored(3, ttl=T0 + 1)), T0) is not None  # delivered
    assert d.notice(notice(stored(2)), T0) is None  # <= last: ignored
    assert (d.cursor, d.last) == (2, 3)


def test_gap_is_filled_from_the_store_before_anything_later() -> None:
    d = core(cursor=2, head=2)
    assert d.notice(notice(stored(5)), T0) is FILL_GAPS
    assert d.notice(notice(stored(6)), T0) is None  # the reader is running: only the target moves
    read = d.next_gap_read()
    assert read == ReadEvents(U, 2, 6, 1000)
    assert d.next_gap_read() is None  # one read at a time
    assert d.notice(notice(stored(7)), T0) is None  # still filling: 7 waits for the store too
    out = d.gap_loaded(read, Page([stored(3), stored(5)], False))  # 4 and 6 own, expired or purged
    assert out == [event_message(stored(3)), event_message(stored(5))]
    assert d.last == 6
    read = d.next_gap_read()
    assert read == ReadEvents(U, 6, 7, 1000)
    assert d.gap_loaded(read, Page([stored(7)], False)) == [event_message(stored(7))]
    assert d.next_gap_read() is None  # caught up: the reader stops
    assert d.notice(notice(stored(8)), T0) is not None  # in order again: straight through


def test_a_notice_without_its_frame_is_read_from_the_store() -> None:
    d = core()
    assert d.notice(notice(stored(1), wire=False), T0) is FILL_GAPS
    read = d.next_gap_read()
    assert read is not None and (read.after, read.upto) == (0, 1)


def test_a_partial_gap_page_continues_after_its_last_event() -> None:
    d = core()
    d.catch_up(9)
    read = d.next_gap_read()
    assert read is not None
    outs = d.gap_loaded(read, Page([stored(2), stored(4)], True))
    assert outs == [event_message(stored(2)), event_message(stored(4)), NoteCursor(1)]  # 1 needed no delivery
    assert d.last == 4
    assert d.next_gap_read() == ReadEvents(U, 4, 9, 1000)


def test_gap_read_failure_closes_with_try_again() -> None:
    d = core()
    d.catch_up(3)
    read = d.next_gap_read()
    assert read is not None
    assert d.gap_failed(read) == [Disconnect(TRY_AGAIN)]
    assert d.next_gap_read() is None
    assert d.catch_up(3) is FILL_GAPS  # a later need starts a reader again


def test_notices_before_start_are_filled_after_it() -> None:
    d = core(head=None)
    assert d.notice(notice(stored(4)), T0) is None
    assert d.catch_up(4) is None
    assert d.start(2) is FILL_GAPS
    assert d.next_gap_read() == ReadEvents(U, 2, 4, 1000)
    d2 = core(head=None)
    d2.notice(notice(stored(2)), T0)
    assert d2.start(3) is None  # nothing newer than H


def test_live_cursor_waits_until_replay_has_reached_head() -> None:
    d = core(cursor=0, head=2)
    n3 = notice(stored(3, device_seq=1))
    assert d.notice(n3, T0) is n3.wire
    assert d.ack({"device_seq": 1}) is None  # C < H: done, but C cannot move yet
    assert d.notice(notice(stored(4, sender=ME)), T0) is None
    assert d.cursor == 0
    outs = d.replay_request(replay_msg(), T0, CFG)
    assert outs == [CountPending(U, 0, 2, T0)]
    outs = d.replay_counted(outs[0], 2)
    assert outs == [ReadPage(U, 0, 2, 3, CFG.max_page_bytes, T0)]
    outs = d.replay_loaded(outs[0], Page([stored(1, device_seq=11), stored(2, device_seq=12)], False))
    assert frame(outs[0])["payload"]["total_events"] == 2
    assert d.ack({"device_seq": 11}) is None
    assert d.ack({"device_seq": 12}) == NoteCursor(4)  # the page (0, 2], then the live run 3, 4
    assert d.cursor == 4


# --- acks ------------------------------------------------------------------------------------------------
def test_device_seq_only_ack_matches_the_earliest_delivery() -> None:
    d = core()
    a, b = stored(1, sender=X, device_seq=5), stored(2, sender=Y, device_seq=5)
    d.notice(notice(a), T0)
    d.notice(notice(b), T0)
    assert d.ack({"device_seq": 5}) == NoteCursor(1)
    assert d.ack({"device_seq": 5.0}) == NoteCursor(2)
    assert d.ack({"device_seq": 5}) is None


@pytest.mark.parametrize(
    "payload",
    [None, [], "ack", {}, {"device_seq": True}, {"device_seq": "1"}, {"device_seq": 1.5}, {"device_seq": 99},
     {"device_seq": 1, "event_id": "unknown"}, {"device_seq": 2, "event_id": "00000001-e"}],
)
def test_malformed_or_unmatched_acks_are_ignored(payload: Any) -> None:
    d = core()
    d.notice(notice(stored(1, device_seq=1)), T0)
    assert d.ack(payload) is None
    assert d.ack({"device_seq": 1}) == NoteCursor(1)  # the delivery is still there


def test_an_event_replayed_twice_takes_two_acks_without_failing() -> None:
    """Regression: a second fresh replay re-sent an event, and the ack of its second copy raised KeyError
    (the connection closed with 1011)."""
    d = core(cursor=0, head=1)
    for _ in range(2):
        count = d.replay_request(replay_msg(), T0, CFG)[-1]
        read = d.replay_counted(count, 1)[0]
        d.replay_loaded(read, Page([stored(1, device_seq=3)], False))
    assert d.ack({"device_seq": 3}) == NoteCursor(1)
    assert d.ack({"device_seq": 3}) is None
    assert d.ack({"device_seq": 3, "event_id": "00000001-e"}) is None


def test_tracking_is_bounded_and_forgotten_deliveries_only_hold_the_cursor() -> None:
    d = core(max_tracked=2)
    for seq in (1, 2, 3):
        d.notice(notice(stored(seq)), T0)
    assert d.ack({"device_seq": 1}) is None  # forgotten
    assert d.ack({"device_seq": 2}) is None  # done, but 1 is not
    assert d.ack({"device_seq": 3}) is None
    assert d.cursor == 0


# --- replay ----------------------------------------------------------------------------------------------
def serve(d: Delivery, msg: Message, *pages: Page, total: int | None = None) -> list[Any]:
    outs = d.replay_request(msg, T0, CFG)
    query = outs[-1]
    if isinstance(query, CountPending):
        outs = d.replay_counted(query, total if total is not None else sum(len(p.events) for p in pages))
        query = outs[-1]
    assert isinstance(query, ReadPage)
    return d.replay_loaded(query, pages[0])


def test_replay_pages_and_continuation_tokens_confirm_pages() -> None:
    d = core(cursor=0, head=6)
    outs = serve(d, replay_msg(limit=2), Page([stored(1), stored(3)], True), total=5)
    body = frame(outs[0])["payload"]
    assert body["has_more"] and body["page_size"] == 2 and body["total_events"] == 5
    assert body["continuation_token"] == make_token(KEY, U, ME, 3, T0)
    assert outs[1:] == [Count("replay_pages"), Count("replay_events", 2)]
    outs = d.replay_request(replay_msg(limit=2, continuation_token=body["continuation_token"]), T0, CFG)
    assert outs == [NoteCursor(3), ReadPage(U, 3, 6, 2, CFG.max_page_bytes, T0)]
    outs = d.replay_loaded(outs[1], Page([], False))
    body = frame(outs[0])["payload"]
    assert body == {"type": "replay_response", "events": [], "has_more": False, "page_size": 0}
    assert outs[-1] == NoteCursor(6)  # an empty final page is confirmed when sent


def test_a_page_not_starting_at_the_cursor_does_not_move_it() -> None:
    d = core(cursor=0, head=6)
    token = make_token(KEY, U, ME, 4, T0)  # from an earlier connection
    outs = d.replay_request(replay_msg(continuation_token=token), T0, CFG)
    assert outs == [ReadPage(U, 4, 6, 3, CFG.max_page_bytes, T0)]
    d.replay_loaded(outs[0], Page([stored(5, device_seq=5)], False))
    assert d.ack({"device_seq": 5}) is None
    assert d.cursor == 0


def test_invalid_token_is_counted_and_served_as_fresh() -> None:
    d = core(cursor=1, head=6)
    outs = d.replay_request(replay_msg(continuation_token="garbage"), T0, CFG)
    assert outs == [Count("invalid_tokens"), CountPending(U, 1, 6, T0)]


def test_full_resync_sets_the_cursor_to_head() -> None:
    d = core(cursor=1, head=40)
    count = d.replay_request(replay_msg(last_ack_device_seq=9), T0, CFG)[0]
    outs = d.replay_counted(count, 13)
    assert outs[:2] == [Count("replay_full_resync"), NoteCursor(40)]
    assert frame(outs[2])["payload"] == {
        "type": "full_resync_required", "reason": "too_many_events", "event_count": 13, "last_ack_device_seq": 9,
        "recommendation": "Clear local state and re-sync from scratch",
    }


def test_replay_failure_answers_replay_failed_and_ignores_late_results() -> None:
    d = core(cursor=0, head=3)
    count = d.replay_request(replay_msg(), T0, CFG)[0]
    assert d.replay_failed(count) == [Count("replay_failed"), Send(REPLAY_FAILED)]
    assert d.replay_counted(count, 1) == []
    assert d.replay_failed(count) == []


def test_every_counted_metric_exists() -> None:
    metrics = Metrics()
    for name in METRICS:
        assert hasattr(getattr(metrics, name), "inc")


# --- pairing: a new binding ----------------------------------------------------------------------------
def test_rebind_drops_results_of_the_old_user() -> None:
    d = core()
    d.notice(notice(stored(2)), T0)
    read = d.next_gap_read()
    assert read is not None
    d.notice(notice(stored(1, device_seq=4)), T0)
    d.rebind(U2, 0)
    assert d.notice(notice(stored(3, user=U2)), T0) is None  # not live yet: remembered
    assert d.gap_loaded(read, Page([stored(1), stored(2)], False)) == []  # stale: nothing of U is sent
    assert d.ack({"device_seq": 4}) is None
    assert d.start(1) is None  # the reader still runs: it takes the new binding's gap
    assert d.next_gap_read() == ReadEvents(U2, 1, 3, 1000)


# --- timers ----------------------------------------------------------------------------------------------
def tick(t: SessionTimers, now: float, last_pong: float = 0.0) -> tuple[Any, ...]:
    return t.tick(now, last_pong, T0 + int(now * 1000), ttl=1000.0, warning_before=300.0, pong_timeout=60.0,
                  ping_interval=30.0)


def test_timers() -> None:
    t = SessionTimers(0.0, T0, 1000.0, 30.0)
    assert t.expires_at == T0 + 1_000_000
    assert tick(t, 1.0) == ()
    assert tick(t, 30.0) == (PING,)
    assert tick(t, 59.0) == ()
    assert tick(t, 61.0, last_pong=59.0) == (NOTE_SEEN, PING)
    assert tick(t, 121.0, last_pong=60.0) == (Disconnect(HEARTBEAT_TIMEOUT),)
    outs = tick(t, 700.5, last_pong=700.0)
    assert json.loads(outs[0].wire)["payload"] == {
        "type": "session_expiring_soon", "expires_in_seconds": 300, "expires_at": T0 + 1_000_000,
    }
    assert Send not in map(type, tick(t, 701.0, last_pong=700.0))  # warned once
    assert tick(t, 1000.0, last_pong=1000.0) == (Disconnect(SESSION_EXPIRED),)


# --- the model -------------------------------------------------------------------------------------------
@attrs.define
class Conn:
    """One connection: its core, what is in flight each way, and what it sent."""

    core: Delivery
    form: str  # "sdk": acks carry event_id; "web": device_seq only
    head: int | None = None  # H, once established
    bus: list[EventNotice] = attrs.Factory(list)  # notices not yet handed over, in publish order
    frames: deque[tuple[str, Any]] = attrs.Factory(deque)  # server -> client, not yet received
    reader: bool = False  # the gap reader task runs
    gap_read: ReadEvents | None = None  # ... and awaits this read
    query: CountPending | ReadPage | None = None  # the message loop awaits this replay query
    live_sent: list[int] = attrs.Factory(list)
    unacked: list[tuple[int, str, int]] = attrs.Factory(list)  # received here: (seq, event_id, device_seq)
    received: set[int] = attrs.Factory(set)  # by the client on this connection
    cursor_seen: int = 0
    last_note: int = 0
    closing: bool = False


BAD_ACKS = [None, {}, {"device_seq": True}, {"device_seq": "1"}, {"device_seq": 0.5}, {"device_seq": 99},
            {"device_seq": 1, "event_id": "nope"}]


class DeliveryModel(RuleBasedStateMachine):
    """The store is a dict, the bus a list (delivered in any order, or dropped), the client a frame queue."""

    MAX_TRACKED = 10_000

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.events: dict[int, StoredEvent] = {}  # committed and not purged
        self.all: dict[int, StoredEvent] = {}  # committed
        self.by_id: dict[str, int] = {}
        self.by_wire: dict[str, int] = {}
        self.head = 0
        self.device_seqs = {ME: 0, X: 0, Y: 0}
        self.noted = 0  # the store's cursor: the highest noted
        self.flushed = 0  # what survives a crash: the cursor at the last orderly close
        # Received by the client on a connection where it then sent a message (an ack or a replay request):
        # all the server can know. The client receives a prefix of what was sent, in order, so an ack matched
        # by device_seq alone (earliest delivery first) is always one of these.
        self.evidence: set[int] = set()
        self.abandoned = 0  # full_resync_required: C := H, the backlog below is given up
        self.tokens: list[str] = []
        self.page_token: str | None = None  # of the last replay_response received
        self.conn = self._connect(0, "sdk")
        self.establish()

    def _connect(self, cursor: int, form: str) -> Conn:
        d = Delivery(U, ME, cursor, max_tracked=self.MAX_TRACKED, token_key=KEY, gap_page=2)
        return Conn(d, form, cursor_seen=cursor, last_note=cursor)

    # --- performing outputs ----------------------------------------------------------------------
    def perform(self, out: Any) -> None:
        c = self.conn
        if out is None:
            return
        if isinstance(out, str):
            seq = self.by_wire[out]
            assert c.head is not None and seq > c.head, "live delivery only above H"
            assert not c.live_sent or seq > c.live_sent[-1], "live delivery in order, at most once"
            assert self.all[seq].device_id != ME and not self.expired(seq)
            c.live_sent.append(seq)
            c.frames.append(("event", seq))
        elif isinstance(out, NoteCursor):
            assert c.last_note < out.cursor <= c.core.cursor
            c.last_note = out.cursor
            self.noted = max(self.noted, out.cursor)
        elif isinstance(out, Send):
            body = json.loads(out.wire)
            if body["type"] == "full_resync_required":
                assert c.head is not None
                self.abandoned = max(self.abandoned, c.head)
            c.frames.append((body["type"], body["payload"]))
        elif out is FILL_GAPS:
            assert not c.reader
            c.reader = True  # the reader task starts soon
        elif isinstance(out, Count):
            assert out.metric in METRICS
        elif isinstance(out, Disconnect):
            assert out.reason == TRY_AGAIN
            c.closing = True
        elif isinstance(out, (CountPending, ReadPage)):
            assert c.query is None
            c.query = out
        else:
            raise AssertionError(f"unexpected output {out!r}")

    def perform_all(self, outs: Any) -> None:
        for out in outs:
            self.perform(out)

    # --- the store -------------------------------------------------------------------------------
    def expired(self, seq: int, now: int | None = None) -> bool:
        ttl = self.all[seq].ttl
        return ttl is not None and ttl <= (self.now if now is None else now)

    def pending(self, after: int, upto: int, now: int) -> list[StoredEvent]:
        return [e for s, e in sorted(self.events.items())
                if after < s <= upto and e.device_id != ME and not self.expired(s, now)]

    def read(self, after: int, upto: int, limit: int, now: int) -> Page:
        found = self.pending(after, upto, now)
        return Page(found[:limit], len(found) > limit)

    @rule(dt=st.sampled_from([0, 0, 1, 30]), commits=st.lists(
        st.tuples(st.sampled_from([ME, X, X, Y]), st.one_of(st.none(), st.integers(-5, 300)),
                  st.sampled_from(["notice", "notice", "notice", "no_wire", "dropped"])),
        min_size=1, max_size=5,
    ))
    def commit(self, dt: int, commits: list[tuple[str, int | None, str]]) -> None:
        """Time passes; events are committed (by this device through this connection, or by others)."""
        self.now += dt * 1000
        for sender, ttl, mode in commits:
            self.head += 1
            self.device_seqs[sender] += 1
            e = attrs.evolve(stored(self.head, sender, self.device_seqs[sender] % 4 + 1),
                             ttl=None if ttl is None else self.now + ttl * 1000, created_at=self.now)
            self.events[self.head] = self.all[self.head] = e
            self.by_id[e.event_id] = self.head
            self.by_wire[event_message(e)] = self.head
            if mode != "dropped":
                self.conn.bus.append(notice(e, wire=mode == "notice"))

    @precondition(lambda self: self.events)
    @rule(pick=st.integers(0, 10**6), expired_only=st.booleans())
    def purge(self, pick: int, expired_only: bool) -> None:
        seqs = sorted(s for s in self.events if self.expired(s) or not expired_only)
        if seqs:
            del self.events[seqs[pick % len(seqs)]]

    # --- the bus and the gap reader ----------------------------------------------------------------
    @precondition(lambda self: self.conn.bus)
    @rule(pick=st.integers(0, 10**6), how=st.sampled_from(["in order", "in order", "any", "drop"]))
    def bus_delivers(self, pick: int, how: str) -> None:
        n = self.conn.bus.pop(0 if how == "in order" else pick % len(self.conn.bus))
        if how != "drop":
            self.perform(self.conn.core.notice(n, self.now))

    @rule()
    def catch_up_poll(self) -> None:
        self.perform(self.conn.core.catch_up(self.head))

    @precondition(lambda self: self.conn.reader)
    @rule(fail=st.sampled_from([False, False, False, True]))
    def reader_step(self, fail: bool) -> None:
        c = self.conn
        if c.gap_read is not None:
            read, c.gap_read = c.gap_read, None
            if fail:
                self.perform_all(c.core.gap_failed(read))
            else:
                self.perform_all(c.core.gap_loaded(read, self.read(read.after, read.upto, read.limit, self.now)))
        if c.closing:  # the gap could not be read: the connection closes
            self._reconnect(crash=False, form=c.form)
            return
        c.gap_read = c.core.next_gap_read()  # the reader asks again at once (no await in between)
        c.reader = c.gap_read is not None

    # --- connections -------------------------------------------------------------------------------
    def _reconnect(self, crash: bool, form: str) -> None:
        if crash:  # cursor moves since the last orderly close are lost
            self.noted = self.flushed
        else:
            self.noted = self.flushed = max(self.noted, self.conn.core.cursor)  # teardown notes the cursor
        self.conn = self._connect(self.noted, form)  # frames in flight are lost

    @rule(crash=st.booleans(), form=st.sampled_from(["sdk", "web"]), establish=st.booleans())
    def reconnect(self, crash: bool, form: str, establish: bool) -> None:
        self._reconnect(crash, form)
        if establish:
            self.establish()

    @precondition(lambda self: self.conn.head is None)
    @rule()
    def establish(self) -> None:
        self.conn.head = self.head  # read after subscribing: notices of later commits are on the bus
        self.perform(self.conn.core.start(self.head))

    # --- the client --------------------------------------------------------------------------------
    @precondition(lambda self: self.conn.frames)
    @rule(n=st.sampled_from([1, 2, 100]))
    def client_receives(self, n: int) -> None:
        c = self.conn
        for _ in range(min(n, len(c.frames))):
            kind, body = c.frames.popleft()
            if kind == "event":
                e = self.all[body]
                c.unacked.append((body, e.event_id, e.device_seq))
                c.received.add(body)
            elif kind == "replay_response":
                for ev in body["events"]:
                    seq = self.by_id[ev["event_id"]]
                    c.unacked.append((seq, ev["event_id"], ev["device_seq"]))
                    c.received.add(seq)
                self.page_token = body.get("continuation_token")
                if self.page_token is not None:
                    self.tokens.append(self.page_token)

    def loop_free(self) -> bool:  # the client's messages are processed one at a time
        return self.conn.head is not None and self.conn.query is None

    @precondition(lambda self: self.loop_free() and self.conn.unacked)
    @rule(pick=st.integers(0, 10**6), bad=st.sampled_from([None] * len(BAD_ACKS) + BAD_ACKS))
    def client_acks(self, pick: int, bad: Any) -> None:
        c = self.conn
        self.evidence |= c.received
        if bad is not None:
            before = (c.core.cursor, len(c.core._deliveries))
            assert c.core.ack(bad) is None
            assert (c.core.cursor, len(c.core._deliveries)) == before
            return
        seq, event_id, device_seq = c.unacked.pop(pick % len(c.unacked))
        payload: dict[str, Any] = {"device_seq": device_seq}
        if c.form == "sdk":
            payload["event_id"] = event_id
        self.perform(c.core.ack(payload))

    @precondition(lambda self: self.loop_free())
    @rule(kind=st.sampled_from(["fresh", "fresh", "page", "page", "any", "garbage"]),
          limit=st.one_of(st.none(), st.integers(0, 4)), pick=st.integers(0, 10**6))
    def client_replays(self, kind: str, limit: int | None, pick: int) -> None:
        self.evidence |= self.conn.received
        params: dict[str, Any] = {"last_ack_device_seq": 3}
        if limit is not None:
            params["limit"] = limit
        if kind == "page" and self.page_token is not None:
            params["continuation_token"] = self.page_token
        elif kind == "any" and self.tokens:
            params["continuation_token"] = self.tokens[pick % len(self.tokens)]
        elif kind == "garbage":
            params["continuation_token"] = "e30.AAAA"
        self.perform_all(self.conn.core.replay_request(replay_msg(**params), self.now, MODEL_CFG))

    @precondition(lambda self: self.conn.query is not None)
    @rule(fail=st.sampled_from([False, False, False, True]))
    def store_answers_replay(self, fail: bool) -> None:
        c = self.conn
        q, c.query = c.query, None
        assert q is not None and c.head is not None and q.upto == c.head
        if fail:
            self.perform_all(c.core.replay_failed(q))
        elif isinstance(q, CountPending):
            self.perform_all(c.core.replay_counted(q, len(self.pending(q.after, q.upto, q.now_ms))))
        else:
            page = self.read(q.after, q.upto, q.limit, q.now_ms)
            assert all(q.after < e.server_seq <= c.head for e in page.events)
            self.perform_all(c.core.replay_loaded(q, page))

    # --- invariants ----------------------------------------------------------------------------------
    @invariant()
    def cursor_never_decreases(self) -> None:
        c = self.conn
        assert c.core.cursor >= c.cursor_seen
        c.cursor_seen = c.core.cursor
        assert c.core.cursor <= self.head

    @invariant()
    def nothing_at_or_below_the_cursor_is_lost(self) -> None:
        for seq in range(1, max(self.conn.core.cursor, self.noted) + 1):
            assert (seq in self.evidence or self.all[seq].device_id == ME or self.expired(seq)
                    or seq not in self.events or seq <= self.abandoned), f"seq {seq} lost below the cursor"

    # --- liveness ------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Everything arrives, nothing fails, the client acks everything it received, in order."""
        c = self.conn
        while True:
            if c.bus:
                self.bus_delivers(0, "in order")
            elif c.query is not None:
                self.store_answers_replay(False)
            elif c.reader:
                self.reader_step(False)
            elif c.frames:
                self.client_receives(len(c.frames))
            elif c.unacked:
                self.client_acks(0, None)
            else:
                return

    @precondition(lambda self: self.conn.head is not None)
    @rule()
    def settle(self) -> None:
        """Then a fresh replay followed page by page to its end brings C to the head, and every event
        committed while subscribed (not own, expired or purged) was delivered live, once."""
        c = self.conn
        assert c.head is not None
        self.perform(c.core.catch_up(self.head))
        self.drain()
        self.page_token = None
        self.client_replays("fresh", 3, 0)
        self.drain()
        for _ in range(self.head + 1):
            if self.page_token is None:
                break
            self.client_replays("page", 3, 0)
            self.drain()
        assert self.page_token is None
        assert (c.core.cursor, c.core.last) == (self.head, self.head)
        for seq in range(c.head + 1, self.head + 1):
            if self.all[seq].device_id != ME and not self.expired(seq) and seq in self.events:
                assert seq in c.live_sent, f"seq {seq} committed while subscribed was not delivered"


class DeliveryModelSmallTracking(DeliveryModel):
    """Deliveries forgotten beyond ``max_tracked``: only re-delivery, never a loss (liveness not checked)."""

    MAX_TRACKED = 3

    @precondition(lambda self: False)
    @rule()
    def settle(self) -> None:
        pass


TestDeliveryModel = DeliveryModel.TestCase
TestDeliveryModel.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestDeliveryModelSmallTracking = DeliveryModelSmallTracking.TestCase
TestDeliveryModelSmallTracking.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
