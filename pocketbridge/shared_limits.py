"""Rate-limit budgets shared between instances through Redis.

Every ``KeyedBuckets`` of the gateway's limits stays the answer: ``take`` is synchronous and never waits on
Redis. A background task reconciles the buckets with Redis every ``SYNC_SECONDS``: for each bucket one Lua
call (all in one pipelined round trip) reports what this instance spent per key since the last round and
gets back each of those keys' shared budget, plus the keys whose shared budget is used up; the local bucket
adopts both. So an address, user or device has one budget across the deployment: an instance refuses a key
within one round of its budget being used up anywhere, and what instances admitted within that round beyond
the budget is owed (a debt of at most one burst), so the long-run rate is the configured one.

While Redis does not answer, each instance keeps its own buckets (the single-instance behaviour), logs the
change once, and ``pocketbridge_rate_limits_shared`` says 0; it retries every ``RETRY_SECONDS``.

Redis keys: ``pocketbridge:rl:<deployment>:<bucket>:<key>`` (a hash: tokens and stamp, with an expiry of a
full refill) and ``pocketbridge:rl:<deployment>:<bucket>`` (a sorted set of the used-up keys, scored by when
they have a token again). ``<deployment>`` is the start of the server public key, so deployments sharing a
Redis keep their own budgets. Keys are addresses and ids, never secrets.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import redis
import trio

from .limits import KeyedBuckets

log = logging.getLogger("pocketbridge.limits")

PREFIX = "pocketbridge:rl:"
SYNC_SECONDS = 0.1  # a round of reconciliation while Redis answers
RETRY_SECONDS = 1.0  # while it does not
TIMEOUT = 0.5  # seconds a Redis socket operation may take
CHUNK = 500  # keys per Lua call: one call never holds Redis for long
MAX_EXHAUSTED = 1000  # used-up keys fetched per bucket and round (deepest debts first)

# KEYS[1]: the bucket's set of used-up keys; KEYS[2..]: one hash per key.
# ARGV: rate (tokens per second), burst, floor (the deepest debt), ttl (ms), how many used-up keys to list,
# then one cost per key (what an instance spent; negative: given back; 0: only look).
# Returns {remaining per key (milli-tokens), {key, milli-tokens, ...} of the used-up keys}. Time is Redis's.
SCRIPT = """
local rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local floor = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local max_exhausted = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exhausted = KEYS[1]
local remaining = {}
for i = 2, #KEYS do
  local cost = tonumber(ARGV[4 + i])
  local state = redis.call('HMGET', KEYS[i], 't', 's')
  local tokens, stamp = tonumber(state[1]), tonumber(state[2])
  if tokens == nil or stamp == nil then
    tokens, stamp = burst, now
  end
  tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
  if cost ~= 0 then
    tokens = math.max(floor, math.min(burst, tokens - cost))
    redis.call('HSET', KEYS[i], 't', tostring(tokens), 's', string.format('%d', now))
    redis.call('PEXPIRE', KEYS[i], ttl)
    if tokens < 1 then
      redis.call('ZADD', exhausted, string.format('%d', now + math.ceil((1 - tokens) / rate)), KEYS[i])
      redis.call('PEXPIRE', exhausted, ttl)
    else
      redis.call('ZREM', exhausted, KEYS[i])
    end
  end
  remaining[i - 1] = math.floor(tokens * 1000)
end
local listed = {}
if max_exhausted > 0 then
  redis.call('ZREMRANGEBYSCORE', exhausted, '-inf', string.format('%d', now))
  local low = redis.call('ZREVRANGEBYSCORE', exhausted, '+inf', '(' .. string.format('%d', now),
                         'WITHSCORES', 'LIMIT', 0, max_exhausted)
  for j = 1, #low, 2 do
    listed[#listed + 1] = low[j]
    listed[#listed + 1] = math.floor((1 - (tonumber(low[j + 1]) - now) * rate) * 1000)
  end
end
return {remaining, listed}
"""


@attrs.frozen
class Report:
    """What one instance spent per key of one bucket, with the bucket's settings."""

    bucket: str
    rate: float  # tokens per second
    burst: float
    keys: Sequence[str]
    costs: Sequence[float]


@attrs.frozen
class Answer:
    remaining: list[float]  # the shared budget of each reported key
    exhausted: dict[str, float]  # keys whose shared budget is below one token, with that budget


class SharedBudget:
    """The Redis side, synchronous (run it in a thread): one pipelined round trip per :meth:`exchange`."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._sha = hashlib.sha1(SCRIPT.encode()).hexdigest()

    def _run(self, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.evalsha(self._sha, len(keys), *keys, *args)
        return pipe.execute()

    def exchange(self, reports: Sequence[Report]) -> list[Answer]:
        calls: list[tuple[list[str], list[Any]]] = []
        counts: list[int] = []  # Lua calls per report
        for report in reports:
            base = f"{self._prefix}{report.bucket}"
            floor = -report.burst
            ttl = int((report.burst - floor) / report.rate * 1000) + 1000
            starts = range(0, len(report.keys), CHUNK) if report.keys else range(1)
            for n, start in enumerate(starts):
                keys = report.keys[start : start + CHUNK]
                calls.append((
                    [base, *(f"{base}:{key}" for key in keys)],
                    [repr(report.rate), repr(report.burst), repr(floor), ttl, MAX_EXHAUSTED if n == 0 else 0,
                     *(repr(float(c)) for c in report.costs[start : start + CHUNK])],
                ))
            counts.append(len(starts))
        try:
            results = self._run(calls)
        except redis.exceptions.NoScriptError:  # a restarted Redis: load the script, once, and go again
            self._client.script_load(SCRIPT)
            results = self._run(calls)
        replies = iter(results)
        answers = []
        for report, count in zip(reports, counts, strict=True):
            remaining: list[float] = []
            exhausted: dict[str, float] = {}
            cut = len(self._prefix) + len(report.bucket) + 1
            for _ in range(count):
                values, listed = next(replies)
                remaining.extend(v / 1000 for v in values)
                for i in range(0, len(listed), 2):
                    exhausted[listed[i].decode()[cut:]] = listed[i + 1] / 1000
            answers.append(Answer(remaining, exhausted))
        return answers


def bucket_names(limits: Any, path: str = "") -> Iterator[tuple[str, KeyedBuckets]]:
    """Every ``KeyedBuckets`` in an attrs tree of limits, named by its path (``connects_per_ip``, ``http.admin``)."""
    for field in attrs.fields(type(limits)):
        value = getattr(limits, field.name)
        if isinstance(value, KeyedBuckets):
            yield path + field.name, value
        elif attrs.has(type(value)):
            yield from bucket_names(value, f"{path}{field.name}.")


def redis_prefix(public_hex: str) -> str:
    """The key prefix of one deployment (every instance shares the identity key)."""
    return f"{PREFIX}{public_hex[:16]}:"


class SharedLimits:
    """Reconciles the buckets of ``current()`` (read each round: a reload replaces them) with Redis."""

    def __init__(
        self, url: str, current: Callable[[], Any], prefix: str, on_mode: Callable[[bool], None] = lambda _: None
    ) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        self._budget = SharedBudget(self._client, prefix)
        self._current = current
        self._on_mode = on_mode
        self._limiter = trio.CapacityLimiter(1)
        self.shared: bool | None = None  # None until the first round
        for _, bucket in bucket_names(current()):
            bucket.track()  # from the start: what is spent before the first round counts too

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            task_status.started()
            while True:
                await self.exchange()
                await trio.sleep(SYNC_SECONDS if self.shared else RETRY_SECONDS)
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    async def exchange(self) -> None:
        """One round: report what was spent, adopt the shared budgets (or fall back to local ones)."""
        buckets = list(bucket_names(self._current()))
        reports = []
        for name, bucket in buckets:
            bucket.track()
            keys, costs = bucket.collect()
            reports.append(Report(name, bucket.rate, bucket.burst, keys, costs))
        try:
            with trio.fail_after(4 * TIMEOUT):
                answers = await trio.to_thread.run_sync(
                    self._budget.exchange, reports, limiter=self._limiter, abandon_on_cancel=True
                )
        except (redis.RedisError, OSError, trio.TooSlowError) as exc:
            self._set_mode(False, type(exc).__name__)
            return
        for (_, bucket), report, answer in zip(buckets, reports, answers, strict=True):
            bucket.adopt([*report.keys, *answer.exhausted], [*answer.remaining, *answer.exhausted.values()])
        self._set_mode(True)

    def _set_mode(self, shared: bool, reason: str = "") -> None:
        if shared == self.shared:
            return
        self.shared = shared
        if shared:
            log.info("rate limits shared between instances through Redis")
        else:
            log.warning("rate limits per instance: Redis does not answer (%s); shared again once it does", reason)
        self._on_mode(shared)

    async def aclose(self) -> None:
        with trio.move_on_after(2 * TIMEOUT):
            await trio.to_thread.run_sync(self._client.close, abandon_on_cancel=True)
