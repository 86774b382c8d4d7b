"""The keys per-address limits use (protocol.md §9): IPv6 by prefix, IPv4 (mapped included) by address, forwarded
entries with ports parsed, and every unparsable entry in one bucket that is neither an address nor the proxy's."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

import pytest

from pocketbridge.limits import UNKNOWN_PEER, address_key, parse_address, parse_networks, peer_address

PROXY = "10.0.0.2"
TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])


def forwarded(*entries: str, prefix: int = 64) -> str:
    """The key of a client whose address a trusted proxy forwarded as ``entries`` (one header line)."""
    return peer_address(PROXY, [", ".join(entries)], TRUSTED, prefix)


def direct(address: str, prefix: int = 64) -> str:
    return peer_address(address, [], (), prefix)


# --- IPv6 by prefix --------------------------------------------------------------------------------------
def test_one_64_is_one_bucket_and_the_next_64_another() -> None:
    keys = {direct(f"2001:db8:aa:bb:{i:x}::{i:x}") for i in range(1, 200)}
    assert keys == {"2001:db8:aa:bb::/64"}
    assert direct("2001:db8:aa:bc::1") == "2001:db8:aa:bc::/64"


@pytest.mark.parametrize("prefix", [32, 48, 56, 60, 64, 96, 127, 128])
def test_the_key_is_the_configured_prefix(prefix: int) -> None:
    address = "2001:db8:1234:5678:9abc:def0:1234:5678"
    expected = address if prefix == 128 else str(ip_network(f"{address}/{prefix}", strict=False))
    assert direct(address, prefix) == expected
    assert forwarded(address, prefix=prefix) == expected
    assert forwarded(f"[{address}]:443", prefix=prefix) == expected


def test_every_spelling_of_an_ipv6_address_is_one_key() -> None:
    spellings = ["2001:db8::1", "2001:DB8::1", "2001:0db8:0000:0000:0000:0000:0000:0001", "[2001:db8::1]",
                 "[2001:db8::1]:443", "[2001:DB8:0::1]:8443"]
    assert {forwarded(s, prefix=128) for s in spellings} == {"2001:db8::1"}
    assert {forwarded(s) for s in spellings} == {"2001:db8::/64"}


def test_ipv6_loopback_keeps_its_own_key() -> None:
    assert direct("::1") == "::1"
    assert address_key(ip_address("::1"), 32) == "::1"


# --- IPv4, mapped or not ---------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [32, 64, 128])
def test_ipv4_is_keyed_on_the_full_address(prefix: int) -> None:
    assert direct("198.51.100.7", prefix) == "198.51.100.7"
    assert direct("198.51.100.8", prefix) == "198.51.100.8"


@pytest.mark.parametrize("spelling", ["::ffff:198.51.100.7", "::FFFF:c633:6407", "[::ffff:198.51.100.7]:5678",
                                      "0:0:0:0:0:ffff:198.51.100.7"])
def test_ipv4_mapped_ipv6_is_ipv4(spelling: str) -> None:
    assert forwarded(spelling) == "198.51.100.7"
    assert parse_address(spelling) == ip_address("198.51.100.7")
    if not spelling.startswith("["):
        assert direct(spelling) == "198.51.100.7"  # a dual-stack socket reports IPv4 clients this way


def test_a_mapped_proxy_address_is_still_the_trusted_ipv4_proxy() -> None:
    assert peer_address("::ffff:10.0.0.2", ["203.0.113.9"], TRUSTED, 64) == "203.0.113.9"


# --- forwarded entries with ports ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("1.2.3.4:5678", "1.2.3.4"),
        ("1.2.3.4:1", "1.2.3.4"),
        ("1.2.3.4:65535", "1.2.3.4"),
        ("[2001:db8::1]:443", "2001:db8::/64"),
        ("[2001:db8::1]", "2001:db8::/64"),
        ("[::ffff:1.2.3.4]:80", "1.2.3.4"),
    ],
)
def test_a_forwarded_entry_with_a_port_is_its_address(entry: str, expected: str) -> None:
    assert forwarded(entry) == expected
    assert forwarded("192.0.2.200", entry) == expected  # the rightmost entry is the one the proxy wrote
    assert forwarded(entry, "10.0.0.9:8080") == expected  # a trusted hop after it (with a port) is skipped


def test_clients_behind_one_proxy_get_their_own_buckets() -> None:
    keys = {forwarded(f"198.51.100.{i}:{40000 + i}") for i in range(1, 50)}
    assert len(keys) == 49
    assert PROXY not in keys


# --- garbage ------------------------------------------------------------------------------------------
GARBAGE = [
    "unknown", "", "not-an-ip", "999.1.1.1", "1.2.3", "01.2.3.4", "1.2.3.4:http", "1.2.3.4:", "1.2.3.4::80",
    "[2001:db8::1", "[2001:db8::1]:", "[2001:db8::1]x", "[2001:db8::1]:https", "_hidden", "1.2.3.4 5.6.7.8",
    "1.2.3.4:99999", "1.2.3.4:65536", "1.2.3.4:123456789012345678901234567890", "[2001:db8::1]:70000",
    "1.2.3.4:\u0661\u0662",  # non-ASCII digits
    "1.2.3.4:+80", "1.2.3.4:-1", "1.2.3.4: 80",
]


@pytest.mark.parametrize("entry", [g for g in GARBAGE if g])
def test_an_unparsable_entry_is_the_unknown_bucket(entry: str) -> None:
    assert parse_address(entry) is None
    key = forwarded(entry)
    assert key == UNKNOWN_PEER
    assert key != PROXY  # never the proxy's own bucket, which would put every client behind it in one
    assert forwarded("198.51.100.7", entry) == UNKNOWN_PEER  # nor the (forgeable) entry left of it


def test_the_unknown_bucket_is_no_address() -> None:
    with pytest.raises(ValueError):
        ip_address(UNKNOWN_PEER)
    with pytest.raises(ValueError):
        ip_network(UNKNOWN_PEER)


def test_garbage_cannot_spread_over_buckets() -> None:
    assert {forwarded(g) for g in GARBAGE if g} == {UNKNOWN_PEER}


def test_no_entry_from_a_trusted_proxy_is_the_proxy_itself() -> None:
    """The proxy's own requests (health checks) carry no client address."""
    assert peer_address(PROXY, [], TRUSTED, 64) == PROXY
    assert peer_address(PROXY, ["", " , "], TRUSTED, 64) == PROXY
