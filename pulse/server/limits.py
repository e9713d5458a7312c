"""Token buckets for ingest: per ingest key and per client IP; over the limit -> 429 with Retry-After."""

from __future__ import annotations

import collections
import functools
import ipaddress
import math
import time


class TokenBuckets:
    """`rate` requests a second per key, bursts up to `burst`; remembers at most `max_keys` keys (LRU)."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self.buckets: collections.OrderedDict[object, tuple[float, float]] = collections.OrderedDict()

    def take(self, key: object, now: float | None = None) -> float:
        """0 if a request may go now (and take its token), else the seconds until one may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self.buckets[key] = (tokens, now)
        if len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return wait


def retry_after(wait: float) -> str:
    return str(max(1, math.ceil(wait)))


@functools.lru_cache(maxsize=4096)
def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False
