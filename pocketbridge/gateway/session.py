"""An established session: in-order message processing, live delivery, acks, replay and cursor.

Live delivery (§5.5): the session tracks ``last``, the highest user seq it has handled. A bus
notice for ``last + 1`` is delivered at once; a notice further ahead means a gap, filled from the
store by the session's gap-filler task before anything later is delivered. Replay (§6) serves
``(C, H]`` page by page; live covers ``> H``. The delivery cursor C moves on confirmed pages and
over acked, own or expired live seqs, and is persisted lazily by the store writer.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from typing import Any

import attrs
import trio

from ..audit import audit
from ..bus import BusMessage, Control, EventNotice
from ..errors import (
    ACCOUNT_DELETED,
    DEVICE_REVOKED,
    HEARTBEAT_TIMEOUT,
    REPLACED,
    REVOKED_CLOSE,
    SEQUENCE_CONFLICT,
    SESSION_EXPIRED,
    TOO_MANY_EVENTS,
    TRY_AGAIN,
    Close,
    StoreUnavailable,
)
from ..limits import TokenBucket
from ..protocol.envelope import Message, as_integral, encode
from ..protocol.events import (
    ErrorFrame,
    NewEvent,
    Rejection,
    ack_stored,
    validate_event,
)
from ..protocol.replay import make_token, parse_replay_request, read_token
from ..store import Device, Outcome, StoredEvent
from ..tracing import span
from .connection import Connection
from .context import Gateway
from .pairing import complete_pairing, initiate_pairing

log = logging.getLogger("pocketbridge.gateway")

UNKNOWN_DEVICE = "Unknown Device"
GAP_FILL_PAGE = 1000
MAX_OPEN_PAGES = 8
MAX_EARLY_MESSAGES = 100  # control messages held back until session_established is sent
SEEN_REFRESH = 60.0  # seconds between last_seen refreshes of an idle connected device (§4)
# Refusals that depend on the store, not on the event (§5.3): rejection acks, final for that event.
STORE_REJECTIONS = {
    Outcome.STORAGE_FULL: ("STORAGE_FULL", "The server's storage is full. Please try again later."),
    Outcome.QUOTA_EXCEEDED: ("QUOTA_EXCEEDED", "Storage quota exceeded"),
}


@attrs.define(eq=False)
class ReplayPage:
    """A served replay page covering (start, end]; confirmed by its token or by acks of all events."""

    start: int
    end: int
    unacked: set[str]


def event_message(event: StoredEvent) -> str:
    return encode({"type": "event", "payload": event.wire()})


def presence_payload(device: Device, online: bool, now_ms: int) -> dict[str, Any]:
    payload: dict[str, Any] = {"type": "device_status_changed", "user_id": device.user_id, "device_id": device.device_id}
    if online:
        payload["device_name"] = device.device_name or UNKNOWN_DEVICE
        payload["device_type"] = device.device_type or "web"
    payload["is_online"] = online
    payload["timestamp"] = now_ms
    return payload


class Session:
    __slots__ = (
        "_by_device_seq", "_deliveries", "_done", "_early_max", "_early_messages", "_gap_filling", "_gap_upto",
        "_live", "_max_tracked", "_next_ping", "_next_seen", "_nursery", "_pages", "_scratchpad", "_started",
        "_warned", "conn", "connection_id", "cursor", "device", "device_id", "expires_at", "gw", "head", "key",
        "last", "pairing_failures", "user_id", "was_replaced", "wire_device_id",
    )  # thousands of idle sessions: no per-instance __dict__
    def __init__(
        self, gw: Gateway, conn: Connection, device: Device, wire_device_id: str, nursery: trio.Nursery
    ) -> None:
        self.gw = gw
        self._nursery = nursery
        self.conn = conn
        self.device = device
        self.user_id = device.user_id
        self.device_id = device.device_id
        self.connection_id = conn.id
        self.key = device.bound_key
        self.wire_device_id = wire_device_id
        self.was_replaced = False
        self.cursor = device.delivery_cursor
        self.head = 0
        self.last = 0
        self._live = False
        self._early_max = 0
        self._early_messages: list[str] = []
        self._gap_upto = 0
        self._gap_filling = False
        self.pairing_failures = 0
        # delivered, not yet acked: event_id -> (server_seq, sender device_seq, replay page or None)
        self._deliveries: OrderedDict[str, tuple[int, int, ReplayPage | None]] = OrderedDict()
        self._by_device_seq: dict[int, deque[str]] = {}
        self._done: set[int] = set()  # live seqs > cursor that need no further delivery
        self._pages: OrderedDict[int, ReplayPage] = OrderedDict()
        cfg = gw.config
        self._max_tracked = cfg.ws.max_tracked_deliveries
        self._started = conn.ws.last_pong = trio.current_time()
        self._warned = False
        self._next_ping = self._started + cfg.ws.ping_interval
        self._next_seen = self._started + SEEN_REFRESH
        self.expires_at = gw.clock.now_ms() + int(cfg.session.ttl * 1000)
        rate = cfg.limits.scratchpad_per_connection_per_second
        self._scratchpad = TokenBucket(rate, 1.0)

    @property
    def short(self) -> str:
        return self.device_id[:8]

    # --- establishment and teardown ------------------------------------------------------------
    async def establish(self) -> None:
        """§3.6 steps 6–7: take over the device, subscribe, read H, mark online, greet, announce."""
        gw = self.gw
        gw.metrics.sessions_open.inc()
        await gw.hub.attach(self)  # closes an older connection of this device here
        if gw.bus.spans_instances:  # and on the other instances
            await gw.bus.publish([Control("takeover", self.user_id, self.device_id, self.connection_id)])
        head = await gw.store.set_presence(self.device_id, self.connection_id, True)  # online; returns H
        self.conn.send(
            encode(
                {
                    "type": "session_established",
                    "payload": {
                        "type": "session_established",
                        "device_id": self.wire_device_id,
                        "user_id": self.user_id,
                        "last_ack_device_seq": self.device.last_ack_device_seq,
                        "expires_at": self.expires_at,
                    },
                }
            )
        )
        # live delivery starts only now, so no event precedes session_established; notices that
        # arrived meanwhile are filled from the store
        self._start_live(head)
        await self._announce(online=True)

    async def teardown(self) -> None:
        """Release everything this session holds (runs shielded, bounded by the store timeout)."""
        gw = self.gw
        gw.metrics.sessions_open.dec()
        await gw.hub.detach(self)
        gw.store.note_cursor(self.device_id, self.user_id, self.cursor)
        if self.was_replaced:
            return
        try:
            await gw.store.set_presence(self.device_id, self.connection_id, False)
            await self._announce(online=False)
        except Exception as exc:  # the device row is corrected at the next connection or restart
            log.warning("device %s: offline update failed: %s", self.short, type(exc).__name__)

    async def _announce(self, online: bool, user_id: str | None = None) -> None:
        """Presence to the other devices of the session's user (or of ``user_id``), on every instance."""
        payload = presence_payload(self.device, online, self.gw.clock.now_ms())
        if user_id is not None:
            payload["user_id"] = user_id
        await self.publish("presence", {"type": "device_status_changed", "payload": payload}, user_id)

    async def publish(self, kind: str, message: dict[str, Any], user_id: str | None = None) -> None:
        """A message for the other connected devices of a user (best-effort, like all bus traffic)."""
        control = Control(kind, user_id or self.user_id, self.device_id, self.connection_id, {"wire": encode(message)})
        try:
            await self.gw.bus.publish([control])
        except Exception as exc:
            log.warning("device %s: %s publish failed: %s", self.short, kind, type(exc).__name__)

    def replaced(self) -> None:
        self.was_replaced = True
        self.conn.close(REPLACED)

    # --- background tasks ----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """The session's timers (§4), driven by the gateway's one clock task: heartbeat pings and
        timeout, the expiry warning and close, and the periodic ``last_seen`` refresh."""
        cfg = self.gw.config
        if now >= self._started + cfg.session.ttl:
            self.conn.close(SESSION_EXPIRED)
            return
        if now - self.conn.ws.last_pong >= cfg.ws.pong_timeout:
            self.conn.close(HEARTBEAT_TIMEOUT)
            return
        if not self._warned and now >= self._started + cfg.session.ttl - cfg.session.warning_before:
            self._warned = True
            self._warn_expiry()
        if now >= self._next_seen:
            self._next_seen = now + SEEN_REFRESH
            self.gw.store.note_seen(self.device_id, self.user_id)
        if now >= self._next_ping:
            self._next_ping = now + cfg.ws.ping_interval
            self.conn.send_ping()

    def _warn_expiry(self) -> None:
        left_ms = max(0, self.expires_at - self.gw.clock.now_ms())
        self.conn.send(
            encode(
                {
                    "type": "session_expiring_soon",
                    "payload": {
                        "type": "session_expiring_soon",
                        "expires_in_seconds": math.ceil(left_ms / 1000),
                        "expires_at": self.expires_at,
                    },
                }
            )
        )

    async def _fill_gaps(self) -> None:
        """Read missing seqs from the store until ``last`` catches up with the newest notice."""
        store = self.gw.store
        try:
            while self._gap_upto > self.last:
                upto = self._gap_upto
                user_id = self.user_id
                self.gw.metrics.gap_fills.inc()
                try:
                    page = await store.read_events(
                        user_id, self.last, upto, exclude_device=self.device_id, now_ms=self.gw.clock.now_ms(),
                        limit=GAP_FILL_PAGE, max_bytes=self.gw.config.replay.max_page_bytes,
                    )
                except StoreUnavailable:
                    self.conn.close(TRY_AGAIN)
                    return
                if user_id != self.user_id:  # paired into another account meanwhile
                    continue
                new_last = page.events[-1].server_seq if page.has_more else upto
                delivered = set()
                for event in page.events:
                    delivered.add(event.server_seq)
                    self._deliver(event.server_seq, event.event_id, event.device_seq, event_message(event))
                for seq in range(self.last + 1, new_last + 1):
                    if seq not in delivered:
                        self._mark_done(seq)
                self.last = new_last
                self._advance()
        finally:
            self._gap_filling = False

    # --- live delivery -------------------------------------------------------------------------
    def on_bus(self, message: BusMessage) -> None:
        if message.user_id != self.user_id:
            return
        if isinstance(message, EventNotice):
            self._on_notice(message)
        elif message.kind == "revoke":
            if message.device_id == self.device_id:
                self._close_revoked(message.data["reason"], REVOKED_CLOSE)
        elif message.kind == "user_deleted":
            self._close_revoked("Account deleted", ACCOUNT_DELETED)
        elif message.device_id != self.device_id:  # presence, scratchpad_sync, device_paired
            if self._live:
                self.conn.send(message.data["wire"])
            elif len(self._early_messages) < MAX_EARLY_MESSAGES:
                self._early_messages.append(message.data["wire"])  # sent right after session_established

    def _close_revoked(self, reason: str, close: Close) -> None:
        payload = {"type": "device_revoked", "reason": reason, "timestamp": self.gw.clock.now_ms()}
        self.conn.close(close, encode({"type": "device_revoked", "payload": payload}))

    def _start_live(self, head: int) -> None:
        self.head = self.last = head
        self._live = True
        for wire in self._early_messages:
            self.conn.send(wire)
        self._early_messages.clear()
        if self._early_max > head:
            self._wake_gap(self._early_max)

    def catch_up(self, head: int) -> None:
        """The store's head for this user is ``head``: fill anything the bus did not bring."""
        if self._live and head > self.last:
            self._wake_gap(head)

    def _wake_gap(self, upto: int) -> None:
        self._gap_upto = max(self._gap_upto, upto)
        if not self._gap_filling:
            self._gap_filling = True
            self._nursery.start_soon(self._fill_gaps)

    def _on_notice(self, n: EventNotice) -> None:
        if not self._live:
            self._early_max = max(self._early_max, n.server_seq)
            return
        if n.server_seq <= self.last:
            return
        if self._gap_upto > self.last or n.server_seq != self.last + 1 or not n.wire:
            self._wake_gap(n.server_seq)
            return
        self.last = n.server_seq
        now = self.gw.clock.now_ms()
        if n.device_id == self.device_id or (n.ttl is not None and n.ttl <= now):
            self._mark_done(n.server_seq)
            self._advance()
        else:
            self._deliver(n.server_seq, n.event_id, n.device_seq, n.wire)
            if n.created_at:
                self.gw.metrics.delivery_latency.observe(max(0, now - n.created_at) / 1000)

    def _deliver(self, seq: int, event_id: str, device_seq: int, wire: str, page: ReplayPage | None = None) -> None:
        self._track(event_id, seq, device_seq, page)
        self.conn.send(wire)
        if page is None:
            self.gw.metrics.events_relayed.inc()

    # --- acks and the delivery cursor ----------------------------------------------------------
    def _track(self, event_id: str, seq: int, device_seq: int, page: ReplayPage | None) -> None:
        if len(self._deliveries) >= self._max_tracked:
            old_id, (_, old_dseq, _) = self._deliveries.popitem(last=False)
            self._untrack_device_seq(old_dseq, old_id)
        self._deliveries[event_id] = (seq, device_seq, page)
        self._by_device_seq.setdefault(device_seq, deque()).append(event_id)

    def _untrack_device_seq(self, device_seq: int, event_id: str) -> None:
        ids = self._by_device_seq.get(device_seq)
        if ids is None:
            return
        try:
            ids.remove(event_id)
        except ValueError:
            pass
        if not ids:
            del self._by_device_seq[device_seq]

    def handle_client_ack(self, payload: Any) -> None:
        """§5.6: match an ack to a delivered event; malformed or unmatched acks are ignored."""
        if not isinstance(payload, dict):
            return
        device_seq = as_integral(payload.get("device_seq"))
        if device_seq is None:
            return
        event_id = payload.get("event_id")
        if isinstance(event_id, str):
            entry = self._deliveries.get(event_id.lower())
            if entry is None or entry[1] != device_seq:
                return
            event_id = event_id.lower()
            self._untrack_device_seq(device_seq, event_id)
        else:
            ids = self._by_device_seq.get(device_seq)
            if not ids:
                return
            event_id = ids.popleft()
            if not ids:
                del self._by_device_seq[device_seq]
        seq, _, page = self._deliveries.pop(event_id)
        if page is None:
            self._mark_done(seq)
            self._advance()
        else:
            page.unacked.discard(event_id)
            if not page.unacked:
                self._confirm(page)

    def _mark_done(self, seq: int) -> None:
        if seq > self.cursor and len(self._done) < self._max_tracked:
            self._done.add(seq)

    def _advance(self) -> None:
        """Once C ≥ H, move C over the run of done seqs after it (§6.2 live rule)."""
        if self.cursor < self.head:
            return
        cursor = self.cursor
        while cursor + 1 in self._done:
            cursor += 1
            self._done.discard(cursor)
        self._set_cursor(cursor)

    def _set_cursor(self, cursor: int) -> None:
        if cursor > self.cursor:
            self.cursor = cursor
            self._done = {s for s in self._done if s > cursor} if self._done else self._done
            self.gw.store.note_cursor(self.device_id, self.user_id, cursor)

    def _confirm(self, page: ReplayPage) -> None:
        self._pages.pop(page.end, None)
        if self.cursor >= page.start:
            self._set_cursor(page.end)
            self._advance()

    # --- messages ------------------------------------------------------------------------------
    async def handle(self, msg: Message) -> None:
        kind = msg.type
        self.gw.store.note_seen(self.device_id, self.user_id)
        if kind == "event":
            await self.handle_event(msg.payload)
        elif kind == "ack":
            self.handle_client_ack(msg.payload)
        elif kind == "replay_request":
            await self.handle_replay(msg)
        elif kind == "ping":
            self.conn.send(encode({"type": "pong", "payload": {"timestamp": self.gw.clock.now_ms()}}))
        elif kind == "scratchpad_sync":
            await self.handle_scratchpad(msg)
        elif kind == "initiate_pairing":
            await initiate_pairing(self)
        elif kind == "complete_pairing":
            await complete_pairing(self, msg.payload)
        else:
            self.gw.metrics.unknown_messages.inc()

    async def handle_event(self, payload: Any) -> None:
        gw = self.gw
        if not gw.limits.events_per_user.take(self.user_id):
            gw.metrics.rate_limited.labels("events_per_user").inc()
            audit(gw, "rate_limited", actor=self.device_id, target=self.user_id, peer=self.conn.peer,
                  detail="events_per_user")
            self.conn.close(TOO_MANY_EVENTS)
            return
        cfg = gw.config
        verdict = validate_event(
            payload,
            session_user=self.user_id,
            bound_key=self.key,
            device_id=self.device_id,
            now_ms=gw.clock.now_ms(),
            max_payload_bytes=cfg.events.max_payload_bytes,
            clock_skew_ms=int(cfg.limits.clock_skew * 1000),
        )
        if isinstance(verdict, ErrorFrame):
            gw.metrics.events.labels("rejected").inc()
            self.conn.send(encode(verdict.frame()))
            return
        if isinstance(verdict, Rejection):
            gw.metrics.events.labels("rejected").inc()
            self.conn.send(encode(verdict.ack()))
            return
        await self._store_event(verdict)

    async def _store_event(self, event: NewEvent) -> None:
        gw = self.gw
        with span("event.ingest", payload_size=event.payload_size) as s:
            try:
                result = await gw.store.append_event(event)
            except StoreUnavailable:
                self.conn.close(TRY_AGAIN)
                return
            if s is not None:
                s.set_attribute("outcome", result.outcome.value)
        gw.metrics.events.labels(result.outcome.value).inc()
        if result.outcome in (Outcome.STORED, Outcome.DUPLICATE):
            self.conn.send(encode(ack_stored(event.device_seq, event.event_id, result.outcome.value)))
        elif result.outcome in STORE_REJECTIONS:
            code, error = STORE_REJECTIONS[result.outcome]
            self.conn.send(encode(Rejection(event.device_seq, event.event_id, code, error).ack()))
        elif result.outcome is Outcome.CONFLICT:
            self.conn.close(SEQUENCE_CONFLICT)
        elif result.outcome is Outcome.REVOKED:
            self.conn.close(DEVICE_REVOKED)
        else:  # the user is being deleted: nothing more is committed for it
            self.conn.close(TRY_AGAIN)

    async def handle_replay(self, msg: Message) -> None:
        gw = self.gw
        cfg = gw.config.replay
        params = parse_replay_request(msg, default_page_size=cfg.default_page_size, max_page_size=cfg.max_page_size)
        now = gw.clock.now_ms()
        position: int | None = None
        if params.continuation_token is not None:
            position = read_token(
                gw.token_key, params.continuation_token, user_id=self.user_id, device_id=self.device_id,
                now_ms=now, max_age_ms=int(cfg.token_max_age * 1000),
            )
            if position is None:
                gw.metrics.invalid_tokens.inc()
            elif position in self._pages:
                self._confirm(self._pages[position])
        fresh = position is None
        start = self.cursor if position is None else min(position, self.head)
        try:
            total = 0
            if fresh:
                total = await gw.store.count_pending(self.user_id, self.device_id, start, self.head, now)
                if total > cfg.full_resync_threshold:
                    self._full_resync(total, params.last_ack_device_seq)
                    return
            page = await gw.store.read_events(
                self.user_id, start, self.head, exclude_device=self.device_id, now_ms=now,
                limit=params.limit, max_bytes=cfg.max_page_bytes,
            )
        except StoreUnavailable:
            gw.metrics.replay_failed.inc()
            self.conn.send(encode({"type": "replay_failed", "payload": {"error": "Replay failed. Please try again later."}}))
            return
        end = page.events[-1].server_seq if page.has_more else self.head
        served = ReplayPage(start, end, {e.event_id for e in page.events})
        response: dict[str, Any] = {
            "type": "replay_response",
            "events": [e.wire() for e in page.events],
            "has_more": page.has_more,
            "page_size": len(page.events),
        }
        if page.has_more:
            response["continuation_token"] = make_token(gw.token_key, self.user_id, self.device_id, end, now)
        if fresh:
            response["total_events"] = total
        for event in page.events:
            self._track(event.event_id, event.server_seq, event.device_seq, served)
        self.conn.send(encode({"type": "replay_response", "payload": response}))
        gw.metrics.replay_pages.inc()
        gw.metrics.replay_events.inc(len(page.events))
        if not served.unacked:
            self._confirm(served)
        else:
            self._pages[end] = served
            while len(self._pages) > MAX_OPEN_PAGES:
                self._pages.popitem(last=False)

    def _full_resync(self, count: int, last_ack_device_seq: int | None) -> None:
        payload: dict[str, Any] = {"type": "full_resync_required", "reason": "too_many_events", "event_count": count}
        if last_ack_device_seq is not None:
            payload["last_ack_device_seq"] = last_ack_device_seq
        payload["recommendation"] = "Clear local state and re-sync from scratch"
        self.gw.metrics.replay_full_resync.inc()
        self._set_cursor(self.head)
        self._advance()
        self.conn.send(encode({"type": "full_resync_required", "payload": payload}))

    async def handle_scratchpad(self, msg: Message) -> None:
        """§5.7: forward unchanged to the user's other devices, best-effort and rate limited."""
        gw = self.gw
        if not self._scratchpad.take():
            gw.metrics.scratchpad_dropped.inc()
            return
        await self.publish("scratchpad", {"type": "scratchpad_sync", "payload": msg.payload})

    async def switch_user(self, device: Device) -> None:
        """§7 step 7: the device now belongs to ``device.user_id``; follow that user's fan-out."""
        old_user = self.user_id
        self.device = device
        self.user_id = device.user_id
        self._live = False
        self._early_max = self._gap_upto = 0
        self._deliveries.clear()
        self._by_device_seq.clear()
        self._done.clear()
        self._pages.clear()
        self.cursor = device.delivery_cursor
        await self.gw.hub.move(self, old_user)
        self._start_live(await self.gw.store.head_seq(self.user_id))

