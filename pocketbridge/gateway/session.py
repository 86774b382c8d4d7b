"""An established session: the driver of the pure delivery core (``pocketbridge.protocol.delivery``).

The session processes the client's messages in order, ingests events, and performs what its
:class:`~pocketbridge.protocol.delivery.Delivery` core and :class:`~pocketbridge.protocol.delivery.SessionTimers`
answer: frames go to the connection's outbox, store reads are awaited (replay) or run by the gap
reader task, cursor moves go to the store writer, counts to the metrics. Presence, pairing, revocation
and scratchpad forwarding stay here: they are bus traffic, not delivery state.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import trio

from ..audit import audit
from ..bus import BusMessage, Control, EventNotice
from ..errors import (
    ACCOUNT_DELETED,
    DEVICE_REVOKED,
    REPLACED,
    REVOKED_CLOSE,
    SEQUENCE_CONFLICT,
    TOO_MANY_EVENTS,
    TRY_AGAIN,
    Close,
    StoreUnavailable,
)
from ..limits import TokenBucket
from ..protocol.acks import AckQueue, Answer, Entry
from ..protocol.delivery import (
    FILL_GAPS,
    NOTE_SEEN,
    PING,
    Count,
    CountPending,
    Delivery,
    Disconnect,
    NoteCursor,
    Output,
    ReadPage,
    Send,
    SessionTimers,
    event_message,
)
from ..protocol.envelope import Message, encode
from ..protocol.events import ErrorFrame, NewEvent, Rejection, ack_stored, validate_event
from ..store import Chain, Device, EventResult, Outcome
from ..tracing import end_span, open_span, within
from .connection import Connection
from .context import Gateway
from .pairing import complete_pairing, initiate_pairing

__all__ = ["Session", "event_message", "presence_payload"]

log = logging.getLogger("pocketbridge.gateway")

UNKNOWN_DEVICE = "Unknown Device"
MAX_EARLY_MESSAGES = 100  # control messages held back until session_established is sent
EVENTS_IN_FLIGHT = 32  # a connection's events handed to the store and not yet answered
# Refusals that depend on the store, not on the event (§5.3): rejection acks, final for that event.
STORE_REJECTIONS = {
    Outcome.STORAGE_FULL: ("STORAGE_FULL", "The server's storage is full. Please try again later."),
    Outcome.QUOTA_EXCEEDED: ("QUOTA_EXCEEDED", "Storage quota exceeded"),
}


def presence_payload(device: Device, online: bool, now_ms: int) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "type": "device_status_changed", "user_id": device.user_id, "device_id": device.device_id,
    }
    if online:
        payload["device_name"] = device.device_name or UNKNOWN_DEVICE
        payload["device_type"] = device.device_type or "web"
    payload["is_online"] = online
    payload["timestamp"] = now_ms
    return payload


class Session:
    __slots__ = (
        "_acks", "_chain", "_early", "_handling", "_nursery", "_room", "_scratchpad", "conn", "connection_id",
        "delivery", "device", "device_id", "gw", "key", "pairing_failures", "timers", "user_id", "was_replaced",
        "wire_device_id",
    )  # thousands of idle sessions: no per-instance __dict__

    def __init__(
        self, gw: Gateway, conn: Connection, device: Device, wire_device_id: str, nursery: trio.Nursery
    ) -> None:
        self.gw = gw
        self._nursery = nursery  # the connection's nursery: the gap reader runs there
        self.conn = conn
        self.device = device
        self.user_id = device.user_id
        self.device_id = device.device_id
        self.connection_id = conn.id
        self.key = device.bound_key
        self.wire_device_id = wire_device_id
        self.was_replaced = False
        self.pairing_failures = 0
        cfg = gw.config
        self.delivery = Delivery(
            device.user_id, device.device_id, device.delivery_cursor,
            max_tracked=cfg.ws.max_tracked_deliveries, token_key=gw.token_key,
        )
        self._early: list[str] | None = []  # control messages before live delivery starts; None once live
        now = conn.ws.last_pong = trio.current_time()
        self.timers = SessionTimers(now, gw.clock.now_ms(), cfg.session.ttl, cfg.ws.ping_interval)
        self._scratchpad = TokenBucket(cfg.limits.scratchpad_per_connection_per_second, 1.0)
        # events handed to the store and not yet answered (made on the first event: idle sessions stay small)
        self._acks: AckQueue | None = None
        self._chain: Chain | None = None
        self._room: trio.Event | None = None  # set when an answer leaves the queue
        self._handling = False  # a client message is being processed

    @property
    def short(self) -> str:
        return self.device_id[:8]

    @property
    def expires_at(self) -> int:
        return self.timers.expires_at

    # --- establishment and teardown ------------------------------------------------------------
    async def establish(self) -> None:
        """§3.6 steps 6–7: take over the device, subscribe, read H, mark online, greet, announce."""
        gw = self.gw
        gw.metrics.sessions_open.inc()
        await gw.hub.attach(self)  # subscribes; closes an older connection of this device here
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
        self._go_live(head)
        await self.announce(online=True)

    def _go_live(self, head: int) -> None:
        start = self.delivery.start(head)
        early, self._early = self._early, None
        for wire in early or ():
            self.conn.send(wire)
        if start is not None:
            self._perform(start)

    async def teardown(self) -> None:
        """Release everything this session holds (runs shielded, bounded by the store timeout)."""
        gw = self.gw
        if self._chain is not None:
            self._chain.stop()  # events of a closed connection still queued are not tried
        gw.metrics.sessions_open.dec()
        await gw.hub.detach(self)
        gw.store.note_cursor(self.device_id, self.user_id, self.delivery.cursor)
        if self.was_replaced:
            return
        try:
            await gw.store.set_presence(self.device_id, self.connection_id, False)
            await self.announce(online=False)
        except Exception as exc:  # the device row is corrected at the next connection or restart
            log.warning("device %s: offline update failed: %s", self.short, type(exc).__name__)

    async def announce(self, online: bool, user_id: str | None = None) -> None:
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

    @property
    def is_live(self) -> bool:
        return self._early is None  # session_established sent: the store names this connection

    def replaced(self) -> None:
        self.was_replaced = True
        self.conn.close(REPLACED)

    # --- performing what the cores answer ----------------------------------------------------------
    def _perform(self, out: Output) -> None:
        """Everything but the replay queries, which :meth:`handle_replay` awaits."""
        if isinstance(out, str):  # a live event read to fill a gap
            self.conn.send(out)
            self.gw.metrics.events_relayed.inc()
        elif isinstance(out, NoteCursor):
            self.gw.store.note_cursor(self.device_id, self.user_id, out.cursor)
        elif isinstance(out, Send):
            self.conn.send(out.wire)
        elif out is FILL_GAPS:
            self._nursery.start_soon(self._fill_gaps)
        elif isinstance(out, Count):
            getattr(self.gw.metrics, out.metric).inc(out.amount)
        elif isinstance(out, Disconnect):
            self.conn.close(out.reason)
        elif out is PING:
            self.conn.send_ping()
        elif out is NOTE_SEEN:
            self.gw.store.note_seen(self.device_id, self.user_id)
        else:
            raise TypeError(f"cannot perform {out!r}")

    async def _fill_gaps(self) -> None:
        """The gap reader: read missing seqs from the store until the core has caught up."""
        gw = self.gw
        delivery = self.delivery
        while (read := delivery.next_gap_read()) is not None:
            gw.metrics.gap_fills.inc()
            try:
                page = await gw.store.read_events(
                    read.user_id, read.after, read.upto, exclude_device=self.device_id, now_ms=gw.clock.now_ms(),
                    limit=read.limit, max_bytes=gw.config.replay.max_page_bytes,
                )
            except StoreUnavailable:
                outs = delivery.gap_failed(read)
            else:
                outs = delivery.gap_loaded(read, page)
            for out in outs:
                self._perform(out)

    # --- timers, bus and catch-up --------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """The session's timers (§4), driven by the gateway's one clock task: heartbeat pings and
        timeout, the expiry warning and close, and the periodic ``last_seen`` refresh."""
        cfg = self.gw.config
        for out in self.timers.tick(
            now, self.conn.ws.last_pong, self.gw.clock.now_ms(), ttl=cfg.session.ttl,
            warning_before=cfg.session.warning_before, pong_timeout=cfg.ws.pong_timeout,
            ping_interval=cfg.ws.ping_interval,
        ):
            self._perform(out)
        since = self._acks.oldest() if self._acks is not None else None
        if since is not None and now - since > cfg.storage.op_timeout:
            self.conn.close(TRY_AGAIN)  # the store did not answer in time (as a waiting write would time out)

    def on_bus(self, message: BusMessage) -> None:
        if message.user_id != self.user_id:
            return
        if isinstance(message, EventNotice):
            now = self.gw.clock.now_ms()
            out = self.delivery.notice(message, now)
            if out is None:
                return
            if out is message.wire:  # the hot path: relay the event as it was encoded at commit
                self.conn.send(out)
                metrics = self.gw.metrics
                metrics.events_relayed.inc()
                if message.created_at:
                    metrics.delivery_latency.observe(max(0, now - message.created_at) / 1000)
            else:
                self._perform(out)
        elif message.kind == "revoke":
            if message.device_id == self.device_id:
                self._close_revoked(message.data["reason"], REVOKED_CLOSE)
        elif message.kind == "user_deleted":
            self._close_revoked("Account deleted", ACCOUNT_DELETED)
        elif message.device_id != self.device_id:  # presence, scratchpad_sync, device_paired
            if self._early is None:
                self.conn.send(message.data["wire"])
            elif len(self._early) < MAX_EARLY_MESSAGES:
                self._early.append(message.data["wire"])  # sent right after session_established

    def _close_revoked(self, reason: str, close: Close) -> None:
        payload = {"type": "device_revoked", "reason": reason, "timestamp": self.gw.clock.now_ms()}
        self.conn.close(close, encode({"type": "device_revoked", "payload": payload}))

    def catch_up(self, head: int) -> None:
        """The store's head for this user is ``head``: fill anything the bus did not bring."""
        out = self.delivery.catch_up(head)
        if out is not None:
            self._perform(out)

    # --- messages ------------------------------------------------------------------------------
    @property
    def awaiting_commits(self) -> bool:
        """Events of this session wait for their commit (their acks are still to go out)."""
        return bool(self._acks)

    async def settled(self) -> None:
        """Until every event read so far is answered (StoreUnavailable after ``[storage] op_timeout``)."""
        await self._wait_acks(below=1)

    async def handle(self, msg: Message) -> None:
        self._handling = True
        try:
            await self._handle(msg)
        finally:
            self._handling = False

    async def _handle(self, msg: Message) -> None:
        kind = msg.type
        self.gw.store.note_seen(self.device_id, self.user_id)
        if kind == "event":
            await self.handle_event(msg.payload)
            return
        if kind == "ack":
            note = self.delivery.ack(msg.payload)
            if note is not None:
                self.gw.store.note_cursor(self.device_id, self.user_id, note.cursor)
            return
        await self._wait_acks(below=1)  # any other reply follows the acks of the events before it
        if kind == "replay_request":
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
            await self._answer_in_turn(Send(encode(verdict.frame())))
            return
        if isinstance(verdict, Rejection):
            gw.metrics.events.labels("rejected").inc()
            await self._answer_in_turn(Send(encode(verdict.ack())))
            return
        await self._store_event(verdict)

    async def _store_event(self, event: NewEvent) -> None:
        """Hand the event to the store without waiting for its commit: the connection's next events may
        follow it into the writer (up to EVENTS_IN_FLIGHT); the acks go out in order (:meth:`_stored`)."""
        if self._acks is None or self._chain is None:
            self._acks, self._chain = AckQueue(EVENTS_IN_FLIGHT), Chain()
            # however the connection closes (from any task), none of its events not yet tried commits
            self.conn.on_close = self._chain.stop
        await self._wait_acks(below=self._acks.depth)
        entry = self._acks.push(trio.current_time())
        ingest = open_span("event.ingest", payload_size=event.payload_size)  # ended by _stored (None: off)
        with within(ingest):  # the writer carries its context to the bus message
            try:
                await self.gw.store.start_append(event, self._chain, partial(self._stored, entry, event, ingest))
            except StoreUnavailable:
                # refused at once (breaker open): the connection closes once the earlier events are answered,
                # and none of its events after this one commits meanwhile, even if the store takes writes again
                self._chain.stop(self._chain.last)
                self._settle(entry, Disconnect(TRY_AGAIN))
                end_span(ingest, outcome="failed")
            except BaseException:  # given up while waiting for room in the writer (the connection closed)
                end_span(ingest, outcome="abandoned")
                raise

    def _stored(
        self, entry: Entry, event: NewEvent, ingest: Any, result: EventResult | None, error: BaseException | None
    ) -> None:
        """The store's answer for one event (called by the writer after the batch, in the chain's order)."""
        end_span(ingest, outcome=result.outcome.value if result is not None else "failed")
        if result is None or error is not None:
            self._settle(entry, Disconnect(TRY_AGAIN))
            return
        outcome = result.outcome
        if outcome is not Outcome.ABANDONED:
            self.gw.metrics.events.labels(outcome.value).inc()
        if outcome in (Outcome.STORED, Outcome.DUPLICATE):
            answer: Answer = Send(encode(ack_stored(event.device_seq, event.event_id, outcome.value)))
        elif outcome in STORE_REJECTIONS:
            code, error_text = STORE_REJECTIONS[outcome]
            answer = Send(encode(Rejection(event.device_seq, event.event_id, code, error_text).ack()))
        elif outcome is Outcome.CONFLICT:
            answer = Disconnect(SEQUENCE_CONFLICT)
        elif outcome is Outcome.REVOKED:
            answer = Disconnect(DEVICE_REVOKED)
        else:  # the user is being deleted, or an earlier event ended the chain: nothing more is committed
            answer = Disconnect(TRY_AGAIN)
        self._settle(entry, answer)

    def _settle(self, entry: Entry, answer: Answer) -> None:
        assert self._acks is not None
        for due in self._acks.answer(entry, answer):
            self._perform(due)
        self._answered()

    async def _answer_in_turn(self, answer: Answer) -> None:
        """An answer known at once goes out after those of the events before it (waiting, like an event,
        while the queue is full)."""
        if self._acks:
            await self._wait_acks(below=self._acks.depth)
        if self._acks:
            self._acks.push(trio.current_time(), answer)
        else:
            self._perform(answer)

    def _answered(self) -> None:
        if self._room is not None:
            self._room.set()
        if not self._acks and not self._handling:  # a drain waiting for the last ack may close now
            self.conn.busy = False
            self.conn.close_if_deferred()

    async def _wait_acks(self, below: int) -> None:
        """Until fewer than ``below`` events wait for their commit (bounded by ``[storage] op_timeout``)."""
        if self._acks is None or len(self._acks) < below:
            return
        with trio.move_on_after(self.gw.config.storage.op_timeout):
            while len(self._acks) >= below:
                self._room = trio.Event()
                await self._room.wait()
            return
        raise StoreUnavailable("events waited too long for their commit")

    async def handle_replay(self, msg: Message) -> None:
        """§6: the core decides; its store queries are awaited here, so the reply goes out before the
        next message is read (§1.4)."""
        gw = self.gw
        store = gw.store
        delivery = self.delivery
        outs = delivery.replay_request(msg, gw.clock.now_ms(), gw.config.replay)
        while outs:
            query: CountPending | ReadPage | None = None
            for out in outs:
                if isinstance(out, (CountPending, ReadPage)):
                    query = out
                else:
                    self._perform(out)
            if query is None:
                return
            try:
                if isinstance(query, CountPending):
                    total = await store.count_pending(
                        query.user_id, self.device_id, query.after, query.upto, query.now_ms
                    )
                    outs = delivery.replay_counted(query, total)
                else:
                    page = await store.read_events(
                        query.user_id, query.after, query.upto, exclude_device=self.device_id, now_ms=query.now_ms,
                        limit=query.limit, max_bytes=query.max_bytes,
                    )
                    outs = delivery.replay_loaded(query, page)
            except StoreUnavailable:
                outs = delivery.replay_failed(query)

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
        self._early = []
        self.delivery.rebind(device.user_id, device.delivery_cursor)
        await self.gw.hub.move(self, old_user)
        self._go_live(await self.gw.store.head_seq(self.user_id))
