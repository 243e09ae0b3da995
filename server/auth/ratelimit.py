"""In-process token buckets for the API's rate limits.

Used for enrollments (per source address and per provisioning token) and failed
bearer-token attempts (per source address). A refused attempt gets the seconds until
it may try again, which the API sends as ``Retry-After`` with a 429.

What always holds:

- A bucket of ``capacity`` tokens refills at ``capacity / period`` per second; each
  counted attempt takes one. Time comes from the injected ``clock`` (monotonic
  seconds), so tests move it instead of sleeping.
- Memory is bounded: at most ``max_keys`` buckets are kept; full buckets (which mean
  nothing) are dropped first, then the least recently touched.
- The state lives in this process: each API replica limits on its own, so behind a
  load balancer of N replicas an address may get up to N times the rate. Put a
  shared limiter (the load balancer's, or a Redis-backed one) in front for a hard
  fleet-wide limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateLimiter"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``capacity`` attempts per ``period`` seconds per key, with bursts up to ``capacity``."""

    def __init__(
        self,
        capacity: int,
        period: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if capacity < 1 or period <= 0 or max_keys < 1:
            raise ValueError("a rate limit needs capacity >= 1, period > 0 and max_keys >= 1")
        self.capacity = capacity
        self.period = period
        self._rate = capacity / period
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def _bucket(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = _Bucket(float(self.capacity), now)
            self._buckets[key] = bucket
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self.capacity), bucket.tokens + elapsed * self._rate)
            bucket.updated = now
        self._buckets.move_to_end(key)
        return bucket

    def _make_room(self, now: float) -> None:
        """Room for one more bucket: drop the full ones, then the least recently touched."""
        if len(self._buckets) < self._max_keys:
            return
        for key in [k for k, b in self._buckets.items() if self._full(b, now)]:
            del self._buckets[key]
        while len(self._buckets) >= self._max_keys:
            self._buckets.popitem(last=False)

    def _full(self, bucket: _Bucket, now: float) -> bool:
        return bucket.tokens + max(0.0, now - bucket.updated) * self._rate >= self.capacity

    def _wait(self, bucket: _Bucket) -> float:
        return (1.0 - bucket.tokens) / self._rate

    def retry_after(self, key: str) -> int | None:
        """Whole seconds until ``key`` may try again, or None if it may now (takes nothing)."""
        with self._lock:
            bucket = self._bucket(key, self._clock())
            return None if bucket.tokens >= 1.0 else max(1, math.ceil(self._wait(bucket)))

    def hit(self, key: str) -> int | None:
        """Take one attempt for ``key``: None if allowed, else whole seconds to wait."""
        with self._lock:
            bucket = self._bucket(key, self._clock())
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return max(1, math.ceil(self._wait(bucket)))
