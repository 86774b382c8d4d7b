"""Token buckets keyed by peer address, user or device; bounded in the number of keys they keep."""

from __future__ import annotations

from collections import OrderedDict

import trio


class KeyedBuckets:
    """``rate`` tokens per ``per`` seconds with ``burst`` capacity, one bucket per key.

    At most ``max_keys`` buckets are kept; the least recently used is forgotten (it was full or
    nearly so, since idle buckets refill).
    """

    def __init__(self, rate: float, per: float, burst: float | None = None, max_keys: int = 100_000) -> None:
        self._rate = rate / per
        self._burst = float(burst if burst is not None else rate)
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens from ``key``'s bucket; False (and nothing spent) if it has too few."""
        now = trio.current_time()
        tokens, stamp = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, key: str, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available for ``key``."""
        tokens, stamp = self._buckets.get(key, (self._burst, trio.current_time()))
        tokens = min(self._burst, tokens + (trio.current_time() - stamp) * self._rate)
        return max(0.0, (cost - tokens) / self._rate)
