"""The delivery core of a session (protocol.md §5.5, §5.6, §6) and the session's timers (§4). Pure: no I/O.

In the style of h11 and wsproto, nothing here awaits, reads a clock, touches a socket, the store, the bus
or the metrics. :class:`Delivery` is fed what happened (a notice of a committed event, a client ack, a
replay request, the result or failure of a store read, a catch-up head, the start of live delivery) and
answers with what to do. The session (``pocketbridge.gateway.session``) performs it and feeds results
back. The answers are:

* a ``str``: the frame of one event to send as live delivery (relayed; its notice's ``wire`` or an event
  read to fill a gap). Live events are the hot path, so they are not wrapped in an object;
* :class:`Send` a frame (``replay_response``, ``full_resync_required``, ``replay_failed``);
* :class:`NoteCursor` persist the delivery cursor C (lazily, coalesced: the store keeps the highest);
* :data:`FILL_GAPS` start the gap reader: call :meth:`Delivery.next_gap_read` until it returns None,
  perform each :class:`ReadEvents` and feed :meth:`Delivery.gap_loaded` or :meth:`Delivery.gap_failed`;
* :class:`CountPending`, :class:`ReadPage` the store queries of a replay: feed :meth:`Delivery.replay_counted`,
  :meth:`Delivery.replay_loaded` or :meth:`Delivery.replay_failed`;
* :class:`Disconnect` close the connection; :class:`Count` increment a metric (a ``Metrics`` attribute).

State (§5.5, §6.2): ``cursor`` (C, persistent), ``head`` (H, the live watermark read after subscribing),
``last`` (the highest seq handled live: delivered, or skipped as own, expired or purged). Live delivery covers
``> H`` in seq order, each at most once; a notice beyond ``last + 1`` (or without its frame) is a gap, read
from the store before anything later is delivered. Replay serves ``(C, H]`` page by page. C moves over
confirmed replay pages and, once C >= H, over the run of acked, own or expired live seqs after it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, Final, Protocol

import attrs

from pocketbridge.errors import HEARTBEAT_TIMEOUT, SESSION_EXPIRED, TRY_AGAIN, Close
from pocketbridge.protocol.envelope import Message, as_integral, encode
from pocketbridge.protocol.replay import make_token, parse_replay_request, read_token

GAP_FILL_PAGE = 1000  # events per gap-filling read
MAX_OPEN_PAGES = 8  # served replay pages remembered for confirmation by their token
SEEN_REFRESH = 60.0  # seconds between last_seen refreshes of an idle connected device (§4)
REPLAY_FAILED = encode({"type": "replay_failed", "payload": {"error": "Replay failed. Please try again later."}})
RESYNC_RECOMMENDATION = "Clear local state and re-sync from scratch"


# --- what the core is fed ----------------------------------------------------------------------------
class Notice(Protocol):
    """A committed event, as the bus announces it (``pocketbridge.bus.EventNotice``)."""

    @property
    def server_seq(self) -> int: ...
    @property
    def device_id(self) -> str: ...  # the sender
    @property
    def event_id(self) -> str: ...
    @property
    def device_seq(self) -> int: ...
    @property
    def ttl(self) -> int | None: ...
    @property
    def wire(self) -> str: ...  # the encoded ``event`` message; "" = read it from the store


class Event(Protocol):
    """A stored event (``pocketbridge.store.StoredEvent``)."""

    @property
    def server_seq(self) -> int: ...
    @property
    def event_id(self) -> str: ...
    @property
    def device_seq(self) -> int: ...
    def wire(self) -> dict[str, Any]: ...


class EventPage(Protocol):
    """An ascending page of stored events (``pocketbridge.store.Page``)."""

    @property
    def events(self) -> Sequence[Event]: ...
    @property
    def has_more(self) -> bool: ...


class ReplaySettings(Protocol):
    """``[replay]`` (``pocketbridge.config.ReplayConfig``), read per request: it can change at run time."""

    @property
    def default_page_size(self) -> int: ...
    @property
    def max_page_size(self) -> int: ...
    @property
    def max_page_bytes(self) -> int: ...
    @property
    def full_resync_threshold(self) -> int: ...
    @property
    def token_max_age(self) -> float: ...


# --- what the core answers -------------------------------------------------------------------------------
@attrs.define
class Send:
    """Send this frame (anything but a live event, which is a bare ``str``)."""

    wire: str


@attrs.define
class NoteCursor:
    """Persist the delivery cursor (lazily; a lost update only causes re-delivery)."""

    cursor: int


@attrs.define
class ReadEvents:
    """Read the user's events in (after, upto], not sent by this device and not expired now, at most
    ``limit`` (and ``[replay] max_page_bytes``): one step of the gap reader."""

    user_id: str
    after: int
    upto: int
    limit: int


@attrs.define
class CountPending:
    """Count the user's events in (after, upto] not sent by this device and not expired at ``now_ms``."""

    user_id: str
    after: int
    upto: int
    now_ms: int


@attrs.define
class ReadPage:
    """Read one replay page: the user's events in (after, upto], not sent by this device, not expired at
    ``now_ms``, at most ``limit`` events and ``max_bytes``."""

    user_id: str
    after: int
    upto: int
    limit: int
    max_bytes: int
    now_ms: int


@attrs.define
class Disconnect:
    """Close the connection."""

    reason: Close


@attrs.define
class Count:
    """Increment the counter ``metric`` (an attribute of ``pocketbridge.metrics.Metrics``) by ``amount``."""

    metric: str
    amount: int = 1


class _Signal:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


FILL_GAPS: Final = _Signal("FILL_GAPS")  # start the gap reader (see the module docstring)
PING: Final = _Signal("PING")  # send a WebSocket protocol ping
NOTE_SEEN: Final = _Signal("NOTE_SEEN")  # refresh the device's last_seen (lazily)

Action = Send | NoteCursor | ReadEvents | CountPending | ReadPage | Disconnect | Count | _Signal
Output = str | Action  # a bare str is a live event frame
NOTHING: Final[tuple[Output, ...]] = ()
METRICS: Final = ("invalid_tokens", "replay_full_resync", "replay_pages", "replay_events", "replay_failed")


def event_message(event: Event) -> str:
    """The ``event`` frame of a stored event (§5.5): exactly its stored fields."""
    return encode({"type": "event", "payload": event.wire()})


class _Page:
    """A served replay page covering (start, end]; confirmed by its token or by acks of all its events."""

    __slots__ = ("end", "start", "unacked")

    def __init__(self, start: int, end: int, unacked: set[str]) -> None:
        self.start = start
        self.end = end
        self.unacked = unacked


class _Replay:
    """The replay request being served (its store query is ``step``)."""

    __slots__ = ("last_ack_device_seq", "limit", "max_bytes", "now_ms", "start", "step", "threshold", "total")

    def __init__(self, start: int, limit: int, now_ms: int, cfg: ReplaySettings, last_ack: int | None) -> None:
        self.start = start
        self.limit = limit
        self.now_ms = now_ms
        self.max_bytes = cfg.max_page_bytes
        self.threshold = cfg.full_resync_threshold
        self.last_ack_device_seq = last_ack
        self.total: int | None = None  # N, on a fresh request
        self.step: CountPending | ReadPage | None = None


class Delivery:
    """What one connection of device ``device_id`` has delivered of user ``user_id``'s events, and what
    its client acknowledged. See the module docstring for the inputs and outputs."""

    __slots__ = (
        "_by_device_seq", "_deliveries", "_done", "_early_max", "_gap_page", "_gap_read", "_gap_reader", "_gap_upto",
        "_max_tracked", "_pages", "_replay", "_token_key", "cursor", "device_id", "head", "last", "live", "user_id",
    )

    def __init__(
        self, user_id: str, device_id: str, cursor: int, *, max_tracked: int, token_key: bytes,
        gap_page: int = GAP_FILL_PAGE,
    ) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.cursor = cursor  # C
        self.head = 0  # H, set by start()
        self.last = 0  # the highest seq handled live
        self.live = False
        self._max_tracked = max_tracked
        self._token_key = token_key
        self._gap_page = gap_page
        self._early_max = 0  # the newest notice seen before start()
        self._gap_upto = 0  # live seqs up to here are known to exist: fill (last, gap_upto] from the store
        self._gap_reader = False  # FILL_GAPS was answered and the reader has not stopped
        self._gap_read: ReadEvents | None = None  # the reader's read in flight
        # Delivered, not yet acked: event_id -> (server_seq, sender's device_seq, replay page or None); and
        # by sender's device_seq, the event ids in send order (one str, or a deque when several).
        self._deliveries: OrderedDict[str, tuple[int, int, _Page | None]] = OrderedDict()
        self._by_device_seq: dict[int, str | deque[str]] = {}
        self._done: set[int] = set()  # live seqs > C that need no further delivery
        self._pages: OrderedDict[int, _Page] = OrderedDict()  # served, unconfirmed pages by their end
        self._replay: _Replay | None = None

    # --- binding and start -------------------------------------------------------------------------
    def start(self, head: int) -> _Signal | None:
        """``session_established`` was sent; ``head`` (H) was read after subscribing to the user's fan-out.
        Notices seen before are filled from the store."""
        self.head = self.last = head
        self.live = True
        if self._early_max > head:
            return self._want_gap(self._early_max)
        return None

    def rebind(self, user_id: str, cursor: int) -> None:
        """The device now belongs to ``user_id`` (pairing, §7), whose cursor for it is ``cursor``: forget
        everything of the old binding, results in flight included, until :meth:`start`."""
        self.user_id = user_id
        self.cursor = cursor
        self.head = self.last = self._early_max = self._gap_upto = 0
        self.live = False
        self._gap_read = None  # a result still coming is stale; the reader itself, if any, carries on
        self._replay = None
        self._deliveries.clear()
        self._by_device_seq.clear()
        self._done.clear()
        self._pages.clear()

    # --- live delivery -----------------------------------------------------------------------------
    def notice(self, n: Notice, now_ms: int) -> Output | None:
        """A committed event of the user: its frame to send now, or what to do instead (at most one)."""
        seq = n.server_seq
        if not self.live:
            if seq > self._early_max:
                self._early_max = seq
            return None
        last = self.last
        if seq <= last:
            return None
        if seq != last + 1 or self._gap_upto > last or not n.wire:
            return self._want_gap(seq)
        self.last = seq
        ttl = n.ttl
        if n.device_id == self.device_id or (ttl is not None and ttl <= now_ms):
            return self._done_live(seq)
        self._track(n.event_id, seq, n.device_seq, None)
        return n.wire

    def catch_up(self, head: int) -> _Signal | None:
        """The store's head for the user is ``head``: fill whatever the bus did not bring."""
        if self.live and head > self.last:
            return self._want_gap(head)
        return None

    def _want_gap(self, upto: int) -> _Signal | None:
        if upto > self._gap_upto:
            self._gap_upto = upto
        if self._gap_reader:
            return None
        self._gap_reader = True
        return FILL_GAPS

    def next_gap_read(self) -> ReadEvents | None:
        """The gap reader's next read, or None: the reader stops (a later gap answers FILL_GAPS again)."""
        if self._gap_reader and self._gap_read is None and self.live and self._gap_upto > self.last:
            self._gap_read = ReadEvents(self.user_id, self.last, self._gap_upto, self._gap_page)
            return self._gap_read
        if self._gap_read is None:
            self._gap_reader = False
        return None

    def gap_loaded(self, read: ReadEvents, page: EventPage) -> list[Output]:
        """The result of ``read``: deliver its events; the seqs it skipped were own, expired or purged."""
        if read is not self._gap_read:
            return []  # stale: the device was paired into another user meanwhile
        self._gap_read = None
        events = page.events
        new_last = events[-1].server_seq if page.has_more else read.upto
        out: list[Output] = []
        delivered = set()
        for event in events:
            seq = event.server_seq
            delivered.add(seq)
            self._track(event.event_id, seq, event.device_seq, None)
            out.append(event_message(event))
        for seq in range(self.last + 1, new_last + 1):
            if seq not in delivered:
                self._mark_done(seq)
        self.last = new_last
        note = self._advance()
        if note is not None:
            out.append(note)
        return out

    def gap_failed(self, read: ReadEvents) -> list[Output]:
        """``read`` failed (store unavailable): close; the client catches up by replay after reconnecting."""
        if read is not self._gap_read:
            return []
        self._gap_read = None
        self._gap_reader = False
        return [Disconnect(TRY_AGAIN)]

    # --- acks and the cursor -----------------------------------------------------------------------
    def _track(self, event_id: str, seq: int, device_seq: int, page: _Page | None) -> None:
        deliveries = self._deliveries
        if len(deliveries) >= self._max_tracked:  # forget the oldest: it is only delivered again later
            old_id, (_, old_device_seq, _) = deliveries.popitem(last=False)
            self._unindex(old_device_seq, old_id)
        deliveries[event_id] = (seq, device_seq, page)
        index = self._by_device_seq
        ids = index.get(device_seq)
        if ids is None:
            index[device_seq] = event_id
        elif isinstance(ids, str):
            index[device_seq] = deque((ids, event_id))
        else:
            ids.append(event_id)

    def _unindex(self, device_seq: int, event_id: str) -> None:
        ids = self._by_device_seq.get(device_seq)
        if ids is None:
            return
        if isinstance(ids, str):
            if ids == event_id:
                del self._by_device_seq[device_seq]
            return
        try:
            ids.remove(event_id)
        except ValueError:
            return
        if not ids:
            del self._by_device_seq[device_seq]

    def _earliest(self, device_seq: int) -> str | None:
        """Take the earliest delivery, in send order, of an event with this sender's device_seq."""
        ids = self._by_device_seq.get(device_seq)
        if ids is None:
            return None
        if isinstance(ids, str):
            del self._by_device_seq[device_seq]
            return ids
        event_id = ids.popleft()
        if not ids:
            del self._by_device_seq[device_seq]
        return event_id

    def ack(self, payload: Any) -> NoteCursor | None:
        """A client ``ack`` (§5.6): with ``event_id``, that delivered event; without, the earliest delivered,
        unacked one with this ``device_seq``. Malformed or unmatched acks are ignored."""
        if not isinstance(payload, dict):
            return None
        device_seq = as_integral(payload.get("device_seq"))
        if device_seq is None:
            return None
        event_id = payload.get("event_id")
        if isinstance(event_id, str):
            event_id = event_id.lower()
            entry = self._deliveries.get(event_id)
            if entry is None or entry[1] != device_seq:
                return None
            self._unindex(device_seq, event_id)
            del self._deliveries[event_id]
        else:
            event_id = self._earliest(device_seq)
            if event_id is None:
                return None
            # None: an event replayed twice, and this is the ack of its second copy
            entry = self._deliveries.pop(event_id, None)
            if entry is None:
                return None
        seq, _, page = entry
        if page is None:
            return self._done_live(seq)
        page.unacked.discard(event_id)
        if page.unacked:
            return None
        return self._confirm(page)

    def _mark_done(self, seq: int) -> None:
        if seq > self.cursor and len(self._done) < self._max_tracked:
            self._done.add(seq)

    def _done_live(self, seq: int) -> NoteCursor | None:
        """Live seq ``seq`` needs no further delivery (acked, own or expired)."""
        cursor = self.cursor
        if seq == cursor + 1 and cursor >= self.head:  # the common case: C moves at once
            cursor = seq
            done = self._done
            while cursor + 1 in done:
                cursor += 1
                done.discard(cursor)
            return self._set_cursor(cursor)
        self._mark_done(seq)
        return self._advance()

    def _advance(self) -> NoteCursor | None:
        """Once C >= H, move C over the run of done seqs after it (§6.2 live rule)."""
        cursor = self.cursor
        if cursor < self.head:
            return None
        done = self._done
        while cursor + 1 in done:
            cursor += 1
            done.discard(cursor)
        return self._set_cursor(cursor)

    def _set_cursor(self, cursor: int) -> NoteCursor | None:
        if cursor <= self.cursor:
            return None
        self.cursor = cursor
        if self._done:
            self._done = {s for s in self._done if s > cursor}
        return NoteCursor(cursor)

    def _confirm(self, page: _Page) -> NoteCursor | None:
        """The client has the page: if C >= its start, C := max(C, its end), then the live rule."""
        if self._pages.get(page.end) is page:
            del self._pages[page.end]
        if self.cursor < page.start:
            return None
        moved = self._set_cursor(page.end)
        return self._advance() or moved

    # --- replay --------------------------------------------------------------------------------------
    def replay_request(self, msg: Message, now_ms: int, cfg: ReplaySettings) -> list[Output]:
        """A ``replay_request`` (§6.1, §6.3): confirm the page its token continues, then query the store."""
        params = parse_replay_request(msg, default_page_size=cfg.default_page_size, max_page_size=cfg.max_page_size)
        out: list[Output] = []
        position: int | None = None
        if params.continuation_token is not None:
            position = read_token(
                self._token_key, params.continuation_token, user_id=self.user_id, device_id=self.device_id,
                now_ms=now_ms, max_age_ms=int(cfg.token_max_age * 1000),
            )
            if position is None:
                out.append(Count("invalid_tokens"))
            else:
                page = self._pages.get(position)
                if page is not None:
                    note = self._confirm(page)
                    if note is not None:
                        out.append(note)
        start = self.cursor if position is None else min(position, self.head)
        replay = self._replay = _Replay(start, params.limit, now_ms, cfg, params.last_ack_device_seq)
        if position is None:
            replay.step = CountPending(self.user_id, start, self.head, now_ms)
        else:
            replay.step = self._page_read(replay)
        out.append(replay.step)
        return out

    def _page_read(self, replay: _Replay) -> ReadPage:
        return ReadPage(self.user_id, replay.start, self.head, replay.limit, replay.max_bytes, replay.now_ms)

    def replay_counted(self, query: CountPending, total: int) -> list[Output]:
        """N for a fresh request: above the threshold, full resync (C := H); else read the page."""
        replay = self._replay
        if replay is None or query is not replay.step:
            return []
        if total > replay.threshold:
            self._replay = None
            payload: dict[str, Any] = {
                "type": "full_resync_required", "reason": "too_many_events", "event_count": total,
            }
            if replay.last_ack_device_seq is not None:
                payload["last_ack_device_seq"] = replay.last_ack_device_seq
            payload["recommendation"] = RESYNC_RECOMMENDATION
            out: list[Output] = [Count("replay_full_resync")]
            moved = self._set_cursor(self.head)
            note = self._advance() or moved
            if note is not None:
                out.append(note)
            out.append(Send(encode({"type": "full_resync_required", "payload": payload})))
            return out
        replay.total = total
        replay.step = self._page_read(replay)
        return [replay.step]

    def replay_loaded(self, query: ReadPage, page: EventPage) -> list[Output]:
        """The page read: answer ``replay_response`` (§6.4) and remember the page until it is confirmed."""
        replay = self._replay
        if replay is None or query is not replay.step:
            return []
        self._replay = None
        events = page.events
        end = events[-1].server_seq if page.has_more else self.head
        served = _Page(replay.start, end, {e.event_id for e in events})
        response: dict[str, Any] = {
            "type": "replay_response",
            "events": [e.wire() for e in events],
            "has_more": page.has_more,
            "page_size": len(events),
        }
        if page.has_more:
            response["continuation_token"] = make_token(
                self._token_key, self.user_id, self.device_id, end, replay.now_ms
            )
        if replay.total is not None:
            response["total_events"] = replay.total
        for event in events:
            self._track(event.event_id, event.server_seq, event.device_seq, served)
        out: list[Output] = [
            Send(encode({"type": "replay_response", "payload": response})),
            Count("replay_pages"),
            Count("replay_events", len(events)),
        ]
        if not served.unacked:
            note = self._confirm(served)
            if note is not None:
                out.append(note)
        else:
            self._pages[end] = served
            while len(self._pages) > MAX_OPEN_PAGES:
                self._pages.popitem(last=False)
        return out

    def replay_failed(self, query: CountPending | ReadPage) -> list[Output]:
        """The replay query failed or timed out: ``replay_failed``; the connection stays open (§6.6)."""
        replay = self._replay
        if replay is None or query is not replay.step:
            return []
        self._replay = None
        return [Count("replay_failed"), Send(REPLAY_FAILED)]


# --- the session's timers (§4) ---------------------------------------------------------------------------
EXPIRED: Final = Disconnect(SESSION_EXPIRED)
HEARTBEAT_LOST: Final = Disconnect(HEARTBEAT_TIMEOUT)


class SessionTimers:
    """Heartbeat pings and timeout, the expiry warning and close, the periodic ``last_seen`` refresh. Times
    are seconds on one monotonic clock, ``now_ms`` wall-clock milliseconds. Settings are passed at each
    tick (they can change at run time)."""

    __slots__ = ("expires_at", "next_ping", "next_seen", "started", "warned")

    def __init__(self, now: float, now_ms: int, ttl: float, ping_interval: float) -> None:
        self.started = now
        self.expires_at = now_ms + int(ttl * 1000)
        self.warned = False
        self.next_ping = now + ping_interval
        self.next_seen = now + SEEN_REFRESH

    def tick(
        self, now: float, last_pong: float, now_ms: int, *, ttl: float, warning_before: float, pong_timeout: float,
        ping_interval: float,
    ) -> tuple[Output, ...]:
        if now >= self.started + ttl:
            return (EXPIRED,)
        if now - last_pong >= pong_timeout:
            return (HEARTBEAT_LOST,)
        out: tuple[Output, ...] = NOTHING
        if not self.warned and now >= self.started + ttl - warning_before:
            self.warned = True
            out += (Send(self.warning(now_ms)),)
        if now >= self.next_seen:
            self.next_seen = now + SEEN_REFRESH
            out += (NOTE_SEEN,)
        if now >= self.next_ping:
            self.next_ping = now + ping_interval
            out += (PING,)
        return out

    def warning(self, now_ms: int) -> str:
        left_ms = max(0, self.expires_at - now_ms)
        payload = {
            "type": "session_expiring_soon", "expires_in_seconds": -(-left_ms // 1000), "expires_at": self.expires_at,
        }
        return encode({"type": "session_expiring_soon", "payload": payload})
