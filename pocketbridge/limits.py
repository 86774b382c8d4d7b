"""Token buckets keyed by peer address, user or device; bounded in the number of keys they keep."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

import attrs
import trio


class TokenBucket:
    """One bucket: ``rate`` tokens per ``per`` seconds, ``rate`` at most."""

    __slots__ = ("_rate", "_burst", "_tokens", "_stamp")

    def __init__(self, rate: float, per: float) -> None:
        self._rate = rate / per
        self._burst = self._tokens = float(rate)
        self._stamp = trio.current_time()

    def take(self) -> bool:
        now = trio.current_time()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class KeyedBuckets:
    """``rate`` tokens per ``per`` seconds with ``burst`` capacity, one bucket per key.

    At most ``max_keys`` buckets are kept; the least recently used is forgotten (it was full or
    nearly so, since idle buckets refill).
    """

    def __init__(self, rate: float, per: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self._rate = rate / per
        self._burst = float(burst if burst is not None else rate)
        self._max_keys = max_keys
        self.settings = (rate, per, self._burst, max_keys)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._spent: dict[str, float] | None = None  # per key, since the last report (tracked buckets only)

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def tracked(self) -> bool:
        return self._spent is not None

    def take(self, key: str, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens from ``key``'s bucket; False (and nothing spent) if it has too few."""
        now = trio.current_time()
        tokens, stamp = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
            if self._spent is not None:
                self._spend(key, cost)
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def give_back(self, key: str, cost: float = 1.0) -> None:
        """Return ``cost`` tokens taken for an attempt that turned out not to count (capped at the burst)."""
        if key in self._buckets:
            tokens, stamp = self._buckets[key]
            self._buckets[key] = (min(self._burst, tokens + cost), stamp)
            if self._spent is not None:
                self._spend(key, -cost)

    # --- sharing the budget between instances (pocketbridge.shared_limits) ---------------------------------
    def track(self) -> None:
        """From now on, keep what is spent per key for :meth:`collect`."""
        if self._spent is None:
            self._spent = {}

    def _spend(self, key: str, cost: float) -> None:
        spent = self._spent
        assert spent is not None
        if key in spent or len(spent) < self._max_keys:  # bounded even if nobody collects for a while
            spent[key] = spent.get(key, 0.0) + cost

    def collect(self) -> tuple[list[str], list[float]]:
        """What was spent per key since the last call (keys that netted out left out), and start afresh."""
        if not self._spent:
            return [], []
        spent, self._spent = self._spent, {}
        keys = [key for key, cost in spent.items() if cost != 0]
        return keys, [spent[key] for key in keys]

    def adopt(self, keys: Sequence[str], remaining: Sequence[float]) -> None:
        """Take each key's shared budget as its own, less what was spent here since it was reported (a
        negative budget is a debt other instances ran up: refused until it refills)."""
        now = trio.current_time()
        since = self._spent or {}
        for key, shared in zip(keys, remaining, strict=True):
            self._buckets[key] = (min(self._burst, shared) - since.get(key, 0.0), now)  # keeps its LRU place
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)

    def retry_after(self, key: str, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available for ``key``."""
        return max(0.0, (cost - self.available(key)) / self._rate)

    def available(self, key: str) -> float:
        """Tokens ``key`` has now (without spending any)."""
        tokens, stamp = self._buckets.get(key, (self._burst, trio.current_time()))
        return min(self._burst, tokens + (trio.current_time() - stamp) * self._rate)


class Counter:
    """Live counts per key (e.g. open connections per address); keys at zero are dropped."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    def add(self, key: str) -> None:
        self._counts[key] = self._counts.get(key, 0) + 1

    def remove(self, key: str) -> None:
        left = self._counts.get(key, 0) - 1
        if left > 0:
            self._counts[key] = left
        else:
            self._counts.pop(key, None)


def carry_over(fresh: Any, previous: Any) -> Any:
    """``fresh`` with every bucket whose settings did not change replaced by its ``previous`` self
    (so a config reload keeps what clients have spent), and live counts always carried over."""
    for field in attrs.fields(type(fresh)):
        new, old = getattr(fresh, field.name), getattr(previous, field.name)
        if isinstance(new, Counter) or (isinstance(new, KeyedBuckets) and new.settings == old.settings):
            setattr(fresh, field.name, old)
        elif isinstance(new, KeyedBuckets) and isinstance(old, KeyedBuckets) and old.tracked:
            new.track()  # a shared bucket stays shared
        elif attrs.has(type(new)):
            carry_over(new, old)
    return fresh


def parse_networks(entries: Iterable[str]) -> tuple[IPv4Network | IPv6Network, ...]:
    return tuple(ip_network(entry, strict=False) for entry in entries)


UNKNOWN_PEER = "unknown"  # the key of a forwarded address that cannot be parsed (never loopback)
Address = IPv4Address | IPv6Address


def _is_port(text: str) -> bool:
    """0-65535 in ASCII digits (``str.isdigit`` alone would take other scripts' digits and any length)."""
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and int(text) <= 65535


def parse_address(text: str) -> Address | None:
    """An address as a socket or an ``X-Forwarded-For`` entry gives it: bare, ``[v6]``, ``v4:port``
    or ``[v6]:port``; IPv4-mapped IPv6 is IPv4. None if it is none of these (a port out of range included)."""
    text = text.strip()
    host = text
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and _is_port(rest[1:]))):
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(port):
            return None
    try:
        address = ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_key(address: Address, ipv6_prefix: int) -> str:
    """The key limits use for an address: IPv4 as is, IPv6 by its prefix (loopback kept as ``::1``)."""
    if isinstance(address, IPv4Address) or address.is_loopback or ipv6_prefix >= 128:
        return str(address)
    return str(ip_network(f"{address}/{ipv6_prefix}", strict=False))


def _trusted(address: Address, trusted: Sequence[IPv4Network | IPv6Network]) -> bool:
    return any(address in net for net in trusted)


def is_trusted_proxy(socket_peer: str, trusted: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Whether the socket's peer is one of ``[server] trusted_proxies`` (its clients are keyed by
    ``X-Forwarded-For``, known only after the HTTP upgrade)."""
    peer = parse_address(socket_peer)
    return peer is not None and bool(trusted) and _trusted(peer, trusted)


def peer_address(
    socket_peer: str,
    forwarded_for: Sequence[str],
    trusted: Sequence[IPv4Network | IPv6Network],
    ipv6_prefix: int = 64,
) -> str:
    """The address limits are keyed on (§9): the socket's peer, unless that is a trusted proxy;
    then the rightmost ``X-Forwarded-For`` entry that is not itself a trusted proxy (an entry that
    cannot be parsed is :data:`UNKNOWN_PEER`). IPv6 addresses are keyed by their ``ipv6_prefix``."""
    peer = parse_address(socket_peer)
    if peer is None:
        return socket_peer  # no address to go by (e.g. "unknown")
    if trusted and _trusted(peer, trusted):
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = parse_address(hop)
            if address is None:
                return UNKNOWN_PEER
            if not _trusted(address, trusted):
                return address_key(address, ipv6_prefix)
    return address_key(peer, ipv6_prefix)
