"""Rate limits shared between instances through Redis (docs/decisions.md, docs/operations.md "Rate limits").

The Redis side is one Lua script (a token bucket per key in a hash with an expiry) run against the machine's
Redis with a key prefix of its own per test; the instance side keeps its local buckets as the answer and
reconciles them with the script in batches. While Redis is unreachable each instance keeps its own budgets,
says so once in the log, and reports it through a callback (the ``pocketbridge_rate_limits_shared`` gauge).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import attrs
import pytest
import redis

from pocketbridge.limits import KeyedBuckets, carry_over
from pocketbridge.metrics import Metrics
from pocketbridge.shared_limits import Report, SharedBudget, SharedLimits, bucket_names
from tests.e2e.test_faults import free_port


@attrs.define
class Inner:
    per_device: KeyedBuckets


@attrs.define
class Small:
    """A stand-in for ``gateway.context.Limits``: buckets, nested attrs classes, other fields."""

    connects: KeyedBuckets
    name: str
    http: Inner


def small(rate: float = 6, per: float = 60.0) -> Small:
    return Small(KeyedBuckets(rate, per), "x", Inner(KeyedBuckets(rate, per)))


# --- the instance side, without Redis ----------------------------------------------------------------------
def test_buckets_are_named_by_their_path() -> None:
    limits = small()
    assert [(name, b) for name, b in bucket_names(limits)] == [
        ("connects", limits.connects), ("http.per_device", limits.http.per_device)
    ]


async def test_a_tracked_bucket_reports_what_it_spent_and_adopts_the_shared_answer() -> None:
    bucket = KeyedBuckets(6, 60.0)
    assert bucket.take("a")
    assert bucket.collect() == ([], [])  # untracked: nothing to report
    bucket.track()
    assert bucket.take("a", 2) and bucket.take("b")
    assert not bucket.take("c", 7)  # refused: nothing spent
    bucket.give_back("b")  # nets out: nothing to report
    assert bucket.collect() == (["a"], [2.0])
    assert bucket.take("a")  # spent after the report went out ...
    bucket.adopt(["a", "c"], [1.5, -2.0])
    assert bucket.available("a") == pytest.approx(0.5, abs=0.01)  # ... is taken off the shared answer
    assert bucket.available("c") == pytest.approx(-2.0, abs=0.01)  # a debt other instances ran up
    assert not bucket.take("c") and bucket.retry_after("c") > 29
    assert bucket.collect() == (["a"], [1.0])  # only what was spent since
    assert bucket.collect() == ([], [])


def test_a_reload_keeps_tracking_on_buckets_whose_settings_changed() -> None:
    old = small()
    for _, bucket in bucket_names(old):
        bucket.track()
    fresh = carry_over(small(rate=7), old)
    assert fresh.connects is not old.connects and fresh.connects.tracked


async def test_falls_back_to_its_own_buckets_while_redis_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    limits = small()
    modes: list[bool] = []
    shared = SharedLimits(f"redis://127.0.0.1:{free_port()}/0", lambda: limits, "pbtest:rl:none:", modes.append)
    caplog.set_level(logging.INFO, "pocketbridge.limits")
    try:
        for _ in range(3):
            assert limits.connects.take("203.0.113.9")
            await shared.exchange()
            assert shared.shared is False
        assert modes == [False]  # one change of mode, one callback ...
        assert len([r for r in caplog.records if "per instance" in r.getMessage()]) == 1  # ... and one log line
        assert [limits.connects.take("203.0.113.9") for _ in range(4)] == [True, True, True, False]
    finally:
        await shared.aclose()


def test_the_gauge_says_local_until_told_otherwise() -> None:
    metrics = Metrics()
    assert metrics.registry.get_sample_value("pocketbridge_rate_limits_shared") == 0.0
    metrics.rate_limits_shared.set(1)
    assert metrics.registry.get_sample_value("pocketbridge_rate_limits_shared") == 1.0


# --- the Lua script against the real Redis -----------------------------------------------------------------
@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    value = f"pbtest:rl:{uuid.uuid4().hex}:"
    yield value
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=value + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_timeout=3)
    yield c
    c.close()


def one(budget: SharedBudget, bucket: str, keys: list[str], costs: list[float], rate: float = 6 / 60, burst: float = 6
        ) -> list[float]:
    return budget.exchange([Report(bucket, rate, burst, keys, costs)])[0].remaining


@pytest.mark.redis
def test_two_reporters_share_one_budget(client: redis.Redis, prefix: str, redis_url: str) -> None:
    other = redis.Redis.from_url(redis_url, socket_timeout=3)
    try:
        a, b = SharedBudget(client, prefix), SharedBudget(other, prefix)
        assert one(a, "connects", ["203.0.113.9"], [3]) == [pytest.approx(3, abs=0.01)]
        assert one(b, "connects", ["203.0.113.9"], [3]) == [pytest.approx(0, abs=0.01)]
        assert one(a, "connects", ["203.0.113.9"], [0]) == [pytest.approx(0, abs=0.01)]  # a refresh
        assert one(a, "connects", ["198.51.100.4"], [1]) == [pytest.approx(5, abs=0.01)]  # its own key
        assert one(a, "handshakes", ["203.0.113.9"], [1]) == [pytest.approx(5, abs=0.01)]  # and bucket
    finally:
        other.close()


@pytest.mark.redis
def test_overspending_becomes_a_debt_no_deeper_than_one_burst(client: redis.Redis, prefix: str) -> None:
    budget = SharedBudget(client, prefix)
    assert one(budget, "e", ["u"], [10]) == [pytest.approx(-4, abs=0.01)]
    assert one(budget, "e", ["u"], [10]) == [pytest.approx(-6, abs=0.01)]
    assert one(budget, "e", ["u"], [-100]) == [pytest.approx(6, abs=0.01)]  # given back: capped at the burst


@pytest.mark.redis
def test_the_budget_refills_at_its_rate_on_the_redis_clock(client: redis.Redis, prefix: str) -> None:
    budget = SharedBudget(client, prefix)
    assert one(budget, "e", ["u"], [10], rate=100, burst=10) == [pytest.approx(0, abs=0.5)]
    time.sleep(0.05)
    [left] = one(budget, "e", ["u"], [0], rate=100, burst=10)
    assert 3 <= left <= 8


@pytest.mark.redis
def test_keys_are_namespaced_expire_and_a_refresh_writes_nothing(client: redis.Redis, prefix: str) -> None:
    budget = SharedBudget(client, prefix)
    assert one(budget, "connects", ["203.0.113.9"], [0]) == [6.0]
    assert client.exists(prefix + "connects:203.0.113.9") == 0
    one(budget, "connects", ["203.0.113.9"], [1])
    ttl = client.pttl(prefix + "connects:203.0.113.9")
    assert 0 < ttl <= (12 / (6 / 60) + 1) * 1000  # a full refill from the deepest debt, and a second
    assert [k.decode() for k in client.scan_iter(match=prefix + "*")] == [prefix + "connects:203.0.113.9"]


@pytest.mark.redis
def test_one_exchange_carries_many_keys_and_buckets(client: redis.Redis, prefix: str) -> None:
    budget = SharedBudget(client, prefix)
    keys = [f"user{i}" for i in range(1200)]
    answers = budget.exchange([Report("e", 1.0, 10, keys, [1.0] * 1200), Report("c", 1.0, 5, ["a"], [2.0])])
    assert [len(a.remaining) for a in answers] == [1200, 1]
    assert all(x == pytest.approx(9, abs=0.1) for x in answers[0].remaining)
    assert answers[1].remaining == [pytest.approx(3, abs=0.1)]


@pytest.mark.redis
def test_every_exchange_lists_the_keys_whose_budget_is_used_up(client: redis.Redis, prefix: str) -> None:
    budget = SharedBudget(client, prefix)
    one(budget, "connects", ["203.0.113.9", "198.51.100.4"], [6, 2])
    [answer] = budget.exchange([Report("connects", 6 / 60, 6, [], [])])  # a bare look: nothing spent
    assert answer.remaining == [] and answer.exhausted == {"203.0.113.9": pytest.approx(0, abs=0.01)}
    one(budget, "connects", ["203.0.113.9"], [3])
    [answer] = budget.exchange([Report("connects", 6 / 60, 6, [], [])])
    assert answer.exhausted == {"203.0.113.9": pytest.approx(-3, abs=0.01)}  # in debt
    one(budget, "connects", ["203.0.113.9"], [-5])  # given back: usable again
    assert budget.exchange([Report("connects", 6 / 60, 6, [], [])])[0].exhausted == {}
    one(budget, "fast", ["u"], [1], rate=100, burst=1)
    assert set(budget.exchange([Report("fast", 100, 1, [], [])])[0].exhausted) == {"u"}
    time.sleep(0.03)  # refilled to a whole token: off the list
    assert budget.exchange([Report("fast", 100, 1, [], [])])[0].exhausted == {}


@pytest.mark.redis
async def test_two_instances_share_one_address_budget(redis_url: str, prefix: str) -> None:
    one_limits, two_limits = small(), small()
    one_modes: list[bool] = []
    one_shared = SharedLimits(redis_url, lambda: one_limits, prefix, one_modes.append)
    two_shared = SharedLimits(redis_url, lambda: two_limits, prefix)
    try:
        await one_shared.exchange()
        await two_shared.exchange()
        assert one_modes == [True] and one_shared.shared and two_shared.shared
        assert all(one_limits.connects.take("203.0.113.9") for _ in range(3))
        await one_shared.exchange()
        assert all(two_limits.connects.take("203.0.113.9") for _ in range(3))
        await two_shared.exchange()
        await one_shared.exchange()  # learns that the key's budget is used up
        assert not one_limits.connects.take("203.0.113.9")
        assert not two_limits.connects.take("203.0.113.9")
        assert one_limits.http.per_device.take("203.0.113.9")  # another bucket, its own budget
        # a key this instance never saw, used up on the other: refused here after one exchange
        assert all(two_limits.connects.take("198.51.100.4") for _ in range(6))
        await two_shared.exchange()
        await one_shared.exchange()
        assert not one_limits.connects.take("198.51.100.4")
    finally:
        await one_shared.aclose()
        await two_shared.aclose()


@pytest.mark.redis
async def test_a_reload_keeps_the_budget_shared(redis_url: str, prefix: str) -> None:
    limits = {"one": small(), "two": small()}
    one_shared = SharedLimits(redis_url, lambda: limits["one"], prefix)
    two_shared = SharedLimits(redis_url, lambda: limits["two"], prefix)
    try:
        await one_shared.exchange()
        limits["one"] = carry_over(small(rate=7), limits["one"])  # SIGHUP with a new connect rate
        assert all(limits["two"].connects.take("203.0.113.9") for _ in range(6))
        await two_shared.exchange()
        await one_shared.exchange()  # the fresh bucket adopts the used-up key ...
        assert not limits["one"].connects.take("203.0.113.9")
        assert limits["one"].connects.take("198.51.100.4")  # ... and reports what it spends
        await one_shared.exchange()
        assert limits["one"].connects.available("198.51.100.4") == pytest.approx(6, abs=0.05)
    finally:
        await one_shared.aclose()
        await two_shared.aclose()
