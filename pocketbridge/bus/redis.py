"""The scale-out bus: Redis pub/sub between instances.

Every message is handed to this instance's sessions at once (the local path never waits on Redis),
and queued for a publisher task that pipelines it to Redis. One subscriber thread listens on the
pattern of all users' channels and hands batches into a bounded trio channel; messages an instance
published itself are skipped on the way back. Redis is only the fast path: a lost message costs
latency, never an event (the hub's catch-up reads the store, more often while Redis is down).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Sequence
from typing import Any

import redis
import trio

from ..errors import BusUnavailable
from ..tracing import trace_context
from . import BusMessage, Control, EventNotice, LocalDelivery, Sink

log = logging.getLogger("pocketbridge.bus")

CHANNEL_PREFIX = "pocketbridge:u:"
PUBLISH_QUEUE = 10_000
RECEIVE_QUEUE = 64  # batches
BATCH = 256
POLL_SECONDS = 0.05
RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0)
MAX_INLINE_WIRE = 256 * 1024  # bigger events travel as a bare notice; receivers read them from the store


def encode_message(origin: str, m: BusMessage, trace: dict[str, str] | None = None) -> tuple[str, bytes]:
    """``trace``: the publisher's W3C trace context, used when the notice carries none of its own. Only the
    trace context travels ("tp": traceparent, "ts": tracestate); without one the keys are absent."""
    if isinstance(m, EventNotice):
        body: dict[str, Any] = {"o": origin, "k": "event", "u": m.user_id, "s": m.server_seq, "d": m.device_id,
                                "i": m.event_id, "q": m.device_seq, "t": m.ttl, "c": m.created_at}
        if len(m.wire) <= MAX_INLINE_WIRE:
            body["w"] = m.wire
        carrier = m.trace or trace
        if carrier and "traceparent" in carrier:
            body["tp"] = carrier["traceparent"]
            if carrier.get("tracestate"):
                body["ts"] = carrier["tracestate"]
    else:
        body = {"o": origin, "k": m.kind, "u": m.user_id, "d": m.device_id, "c": m.connection_id, "x": m.data}
    return CHANNEL_PREFIX + m.user_id, json.dumps(body, separators=(",", ":")).encode()


def decode_message(data: bytes) -> tuple[str, BusMessage]:
    b = json.loads(data)
    if b["k"] == "event":
        tp = b.get("tp")  # a malformed trace context costs the trace, never the notice
        trace: dict[str, str] | None = None
        if isinstance(tp, str):
            trace = {"traceparent": tp}
            ts = b.get("ts")
            if isinstance(ts, str):
                trace["tracestate"] = ts
        return b["o"], EventNotice(b["u"], b["s"], b["d"], b["i"], b["q"], b["t"], b.get("w", ""), b.get("c", 0),
                                   trace)
    return b["o"], Control(b["k"], b["u"], b["d"], b["c"], b["x"])


class RedisBus(LocalDelivery):
    spans_instances = True
    def __init__(self, url: str, instance_id: str) -> None:
        self._origin = instance_id
        self._own_prefix = json.dumps({"o": instance_id})[:-1].replace(" ", "").encode() + b","
        super().__init__()
        self._out_send, self._out_receive = trio.open_memory_channel[tuple[str, bytes]](PUBLISH_QUEUE)
        self._client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._publish_limiter = trio.CapacityLimiter(1)
        self.connected = False
        self.changed = trio.Event()  # set (and replaced) whenever ``connected`` flips
        self.dropped = 0

    async def run(self, sink: Sink, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._sink = sink
        batches_send, batches_receive = trio.open_memory_channel[list[bytes]](RECEIVE_QUEUE)
        stop = threading.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._publisher)
                nursery.start_soon(self._dispatcher, batches_receive)
                nursery.start_soon(self._subscribe_thread, batches_send, stop)
                task_status.started()
        finally:
            stop.set()
            self._sink = None
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._client.close)

    async def _subscribe_thread(self, batches: trio.MemorySendChannel[list[bytes]], stop: threading.Event) -> None:
        token = trio.lowlevel.current_trio_token()
        try:
            await trio.to_thread.run_sync(self._listen, batches, stop, token, abandon_on_cancel=True)
        finally:
            stop.set()

    def _listen(self, batches: trio.MemorySendChannel[list[bytes]], stop: threading.Event, token: Any) -> None:
        """The subscriber thread: (re)subscribe, read, hand batches to trio; back off while Redis is down."""
        attempt = 0
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(CHANNEL_PREFIX + "*")
                while pubsub.get_message(timeout=POLL_SECONDS) is None and not pubsub.subscribed:
                    pass
                trio.from_thread.run_sync(self._set_connected, True, trio_token=token)
                attempt = 0
                while not stop.is_set():
                    batch: list[bytes] = []
                    message = pubsub.get_message(timeout=POLL_SECONDS)
                    while message is not None and len(batch) < BATCH:
                        if message.get("type") == "pmessage":
                            batch.append(message["data"])
                        message = pubsub.get_message(timeout=0)
                    if batch:
                        trio.from_thread.run(batches.send, batch, trio_token=token)
            except (redis.RedisError, OSError) as exc:
                if stop.is_set():
                    return
                log.warning("Redis subscription lost (%s); retrying", type(exc).__name__)
                try:
                    trio.from_thread.run_sync(self._set_connected, False, trio_token=token)
                except trio.RunFinishedError:
                    return
                stop.wait(RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)])
                attempt += 1
            except (trio.RunFinishedError, trio.Cancelled):
                return
            finally:
                if pubsub is not None:
                    with contextlib.suppress(redis.RedisError, OSError):
                        pubsub.close()

    def _set_connected(self, up: bool) -> None:
        if up != self.connected:
            log.info("Redis bus subscribed" if up
                     else "Redis bus down; delivery between instances goes through the store")
            self.changed.set()
            self.changed = trio.Event()
        self.connected = up

    async def _dispatcher(self, batches: trio.MemoryReceiveChannel[list[bytes]]) -> None:
        async for batch in batches:
            for data in batch:
                if data.startswith(self._own_prefix):
                    continue  # published here; delivered locally already
                try:
                    origin, message = decode_message(data)
                except (ValueError, KeyError, TypeError):
                    log.warning("ignored a malformed bus message")
                    continue
                if origin != self._origin:
                    self.deliver(message)

    async def _publisher(self) -> None:
        while True:
            batch = [await self._out_receive.receive()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._out_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            try:
                await trio.to_thread.run_sync(self._publish_sync, batch, limiter=self._publish_limiter)
            except (redis.RedisError, OSError) as exc:
                self.dropped += len(batch)
                log.warning("Redis publish of %d messages failed (%s)", len(batch), type(exc).__name__)

    def _publish_sync(self, batch: list[tuple[str, bytes]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for channel, data in batch:
            pipe.publish(channel, data)
        pipe.execute()

    async def publish(self, messages: Sequence[BusMessage]) -> None:
        trace = trace_context()  # None while tracing is off
        for message in messages:
            self.deliver(message)
            try:
                self._out_send.send_nowait(encode_message(self._origin, message, trace))
            except trio.WouldBlock:
                self.dropped += 1  # other instances catch up from the store

    async def ping(self) -> None:
        try:
            with trio.fail_after(3):
                await trio.to_thread.run_sync(self._client.ping, abandon_on_cancel=True)
        except (redis.RedisError, OSError, trio.TooSlowError) as exc:
            raise BusUnavailable("Redis unreachable") from exc
        if not self.connected:
            raise BusUnavailable("Redis subscription down")
