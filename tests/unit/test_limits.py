"""Rate-limit building blocks and the peer address limits are keyed on (protocol.md §9, §10.1).

§9: "The peer address is the socket's. ``X-Forwarded-For`` is honoured only when the socket peer is listed in
``[server] trusted_proxies``; the address used is then the rightmost one not in that list (an entry with a port is
parsed; an unparsable entry is treated as an unknown, non-loopback address). IPv6 peers are keyed by their
``[limits] ipv6_prefix`` (default /64)."
"""

from __future__ import annotations

from ipaddress import ip_address

import attrs
import pytest
import trio
import trio.testing

from pocketbridge.http.app import is_loopback
from pocketbridge.limits import (
    Counter,
    KeyedBuckets,
    TokenBucket,
    carry_over,
    parse_networks,
    peer_address,
)

PROXIES = parse_networks(["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8"])


def key(socket_peer: str, *forwarded: str, trusted: tuple = PROXIES, **kw: int) -> str:
    return peer_address(socket_peer, list(forwarded), trusted, **kw)


def is_loopback_key(value: str) -> bool:
    """How the HTTP side recognises a loopback peer (``/metrics`` is served to those only)."""
    return is_loopback(value)


# --- X-Forwarded-For and trusted proxies -----------------------------------------------------------------
def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert key("198.51.100.7", "203.0.113.9", trusted=()) == "198.51.100.7"
    assert key("127.0.0.1", "203.0.113.9", trusted=()) == "127.0.0.1"


def test_a_peer_that_is_not_a_trusted_proxy_cannot_claim_another_address() -> None:
    assert key("198.51.100.7", "203.0.113.9") == "198.51.100.7"
    assert key("192.0.2.1", "127.0.0.1") == "192.0.2.1"  # nor pretend to be loopback


def test_a_trusted_proxy_forwards_the_client_address() -> None:
    assert key("127.0.0.1", "203.0.113.9") == "203.0.113.9"
    assert key("10.1.2.3", "203.0.113.9") == "203.0.113.9"  # a CIDR entry
    assert key("127.0.0.1", "  203.0.113.9  ") == "203.0.113.9"


def test_the_rightmost_untrusted_entry_wins() -> None:
    # the client could have written anything left of what the trusted proxies appended
    assert key("127.0.0.1", "192.0.2.66, 203.0.113.9") == "203.0.113.9"
    # trusted hops on the right are skipped
    assert key("127.0.0.1", "192.0.2.66, 203.0.113.9, 10.0.0.5, 10.9.9.9") == "203.0.113.9"
    # several header lines form one list, in order
    assert key("127.0.0.1", "192.0.2.66", "203.0.113.9, 10.0.0.5") == "203.0.113.9"
    assert key("127.0.0.1", "203.0.113.9, 10.0.0.5", "192.0.2.66") == "192.0.2.66"


def test_only_trusted_hops_or_no_header_leave_the_socket_peer() -> None:
    assert key("127.0.0.1") == "127.0.0.1"
    assert key("127.0.0.1", "") == "127.0.0.1"
    assert key("127.0.0.1", " , ,") == "127.0.0.1"
    assert key("10.0.0.7", "10.0.0.5, 127.0.0.1") == "10.0.0.7"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("203.0.113.9:5555", "203.0.113.9"),
        ("203.0.113.9:0", "203.0.113.9"),
        ("[2001:db8::7]:443", "2001:db8::/64"),
        ("[2001:db8::7]", "2001:db8::/64"),
        ("2001:db8::7", "2001:db8::/64"),
    ],
)
def test_an_entry_with_a_port_is_parsed(entry: str, expected: str) -> None:
    assert key("127.0.0.1", entry) == expected
    assert key("127.0.0.1", f"192.0.2.66, {entry}") == expected


def test_a_trusted_proxy_given_with_a_port_is_still_skipped() -> None:
    assert key("127.0.0.1", "203.0.113.9, 10.0.0.5:8080") == "203.0.113.9"
    assert key("127.0.0.1", "203.0.113.9, [::1]:8080") == "203.0.113.9"


@pytest.mark.parametrize("garbage", ["unknown", "not-an-ip", "999.1.1.1", "203.0.113.9:http", "[::1", "_hidden", "1.2.3"])
def test_an_unparsable_entry_is_an_unknown_non_loopback_address(garbage: str) -> None:
    got = key("127.0.0.1", garbage)
    assert got != "127.0.0.1", "a garbled header must not fall back to the (loopback) proxy"
    assert not is_loopback_key(got)
    with pytest.raises(ValueError):
        ip_address(got)  # no real client can share its bucket
    # it is the rightmost untrusted entry: the address left of it is not used either
    assert key("127.0.0.1", f"203.0.113.9, {garbage}") == got
    # every unparsable entry is the same unknown address
    assert key("127.0.0.1", "another garbage") == got


def test_a_forwarded_loopback_address_from_a_trusted_proxy_is_taken_as_sent() -> None:
    # only what a trusted proxy reports is believed; a loopback client behind it stays loopback
    assert key("10.0.0.5", "127.0.0.2") == "127.0.0.2"


# --- IPv6 prefixes ---------------------------------------------------------------------------------------
def test_ipv6_peers_are_keyed_by_their_64_prefix_by_default() -> None:
    one = key("2001:db8:1:2:aaaa:bbbb:cccc:dddd", trusted=())
    assert one == "2001:db8:1:2::/64"
    assert key("2001:db8:1:2::1", trusted=()) == one  # same /64, same budget
    assert key("2001:db8:1:3::1", trusted=()) != one  # next /64, its own
    assert key("2001:DB8:1:2::1", trusted=()) == one  # spelling does not matter


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [(48, "2001:db8:1::/48"), (56, "2001:db8:1:200::/56"), (64, "2001:db8:1:2ff::/64"), (128, "2001:db8:1:2ff::1")],
)
def test_the_ipv6_prefix_is_configurable(prefix: int, expected: str) -> None:
    assert key("2001:db8:1:2ff::1", trusted=(), ipv6_prefix=prefix) == expected


def test_forwarded_ipv6_clients_are_keyed_by_prefix_too() -> None:
    assert key("::1", "2001:db8:5:6::42") == "2001:db8:5:6::/64"
    assert key("fd00::1", "2001:db8:5:6::42, fd12::9") == "2001:db8:5:6::/64"  # fd00::/8 is trusted


def test_ipv4_peers_are_never_masked() -> None:
    assert key("198.51.100.7", trusted=(), ipv6_prefix=32) == "198.51.100.7"
    assert key("198.51.100.8", trusted=(), ipv6_prefix=32) == "198.51.100.8"


def test_ipv4_mapped_peers_are_ipv4() -> None:
    assert key("::ffff:198.51.100.7", trusted=()) == "198.51.100.7"
    assert key("::ffff:127.0.0.1", "203.0.113.9") == "203.0.113.9"  # matches the IPv4 proxy entry


def test_loopback_stays_recognisable() -> None:
    assert is_loopback_key(key("::1", trusted=()))
    assert is_loopback_key(key("127.0.0.1", trusted=()))
    assert not is_loopback_key(key("2001:db8::1", trusted=()))


def test_a_socket_without_an_address_keeps_its_placeholder() -> None:
    assert key("unknown", "203.0.113.9") == "unknown"


# --- buckets and counters (trio's clock) -----------------------------------------------------------------
async def test_token_bucket_burst_and_refill(mock_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(3, 1.0)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    mock_clock.jump(1 / 3 + 1e-6)
    assert bucket.take() is True
    assert bucket.take() is False
    mock_clock.jump(60)  # never more than the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


async def test_keyed_buckets_are_per_key(mock_clock: trio.testing.MockClock) -> None:
    buckets = KeyedBuckets(2, 60.0)
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    assert buckets.take("b") is True  # another key has its own budget
    assert buckets.retry_after("a") == pytest.approx(30.0)
    mock_clock.jump(29.9)
    assert buckets.take("a") is False
    mock_clock.jump(0.2)
    assert buckets.take("a") is True


async def test_keyed_buckets_burst_cost_and_available(mock_clock: trio.testing.MockClock) -> None:
    buckets = KeyedBuckets(60, 60.0, burst=5)
    assert buckets.available("x") == 5
    assert buckets.take("x", cost=4) is True
    assert buckets.take("x", cost=2) is False  # nothing is spent by a refusal
    assert buckets.available("x") == pytest.approx(1)
    assert buckets.retry_after("x", cost=2) == pytest.approx(1.0)
    mock_clock.jump(1.0)
    assert buckets.take("x", cost=2) is True
    mock_clock.jump(3600)
    assert buckets.available("x") == 5


async def test_keyed_buckets_forget_the_least_recently_used_key(mock_clock: trio.testing.MockClock) -> None:
    buckets = KeyedBuckets(1, 3600.0, max_keys=2)
    assert buckets.take("a") and buckets.take("b")
    assert buckets.take("a") is False  # "a" is now the most recently used
    assert buckets.take("c") is True  # evicts "b"
    assert buckets.take("a") is False  # still remembered (spent)
    assert buckets.take("b") is True  # forgotten: a full bucket again


def test_counter_counts_and_drops_zero_keys() -> None:
    counter = Counter()
    counter.add("p")
    counter.add("p")
    counter.remove("p")
    assert counter.get("p") == 1
    counter.remove("p")
    counter.remove("p")  # never negative
    assert counter.get("p") == 0
    assert counter._counts == {}


async def test_carry_over_keeps_spent_tokens_unless_the_setting_changed(mock_clock: trio.testing.MockClock) -> None:
    @attrs.define
    class Inner:
        buckets: KeyedBuckets

    @attrs.define
    class Outer:
        same: KeyedBuckets
        changed: KeyedBuckets
        live: Counter
        inner: Inner

    old = Outer(KeyedBuckets(2, 60.0), KeyedBuckets(2, 60.0), Counter(), Inner(KeyedBuckets(1, 60.0)))
    old.same.take("k")
    old.same.take("k")
    old.changed.take("k")
    old.changed.take("k")
    old.live.add("p")
    old.inner.buckets.take("k")
    fresh = carry_over(Outer(KeyedBuckets(2, 60.0), KeyedBuckets(5, 60.0), Counter(), Inner(KeyedBuckets(1, 60.0))), old)
    assert fresh.same.take("k") is False  # what was spent stays spent
    assert fresh.changed.take("k") is True  # a new limit starts afresh
    assert fresh.live.get("p") == 1  # live counts always carry over
    assert fresh.inner.buckets.take("k") is False  # nested holders too
