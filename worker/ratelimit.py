"""The global call-rate limiter: GCRA in one Lua script on the Redis server's clock, shared by all workers."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.errors import RateLimited

# Returns {allowed, wait_us}. Uses the server's TIME so worker clocks never matter.
_GCRA = """
local key = KEYS[1]
local emission = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', key) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - burst * emission
if allow_at > now then return {0, allow_at - now} end
redis.call('SET', key, new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
"""


@dataclass(frozen=True)
class RateSpec:
    """A rate in calls per second and how many calls may go back to back."""

    per_second: float
    burst: int = 1

    @property
    def emission_us(self) -> int:
        return max(1, round(1_000_000 / self.per_second))


class RateLimiter:
    """acquire() returns once a call may go; it never waits longer than max_wait_s in-process."""

    def __init__(self, redis: Any, key: str, spec: RateSpec, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._redis = redis
        self._key = key
        self._spec = spec
        self._script = redis.register_script(_GCRA)
        self._sleep = sleep

    def try_acquire(self) -> float:
        """0.0 when admitted, else the seconds to wait before asking again."""
        allowed, wait_us = self._script(keys=[self._key], args=[self._spec.emission_us, self._spec.burst])
        return 0.0 if int(allowed) == 1 else int(wait_us) / 1_000_000

    def acquire(self, max_wait_s: float = 30.0) -> None:
        """Wait (briefly, in-process) for a slot; beyond max_wait_s raise RateLimited for a deferral."""
        deadline = time.monotonic() + max_wait_s
        while True:
            wait = self.try_acquire()
            if wait == 0.0:
                return
            if time.monotonic() + wait > deadline:
                raise RateLimited("global rate limit: no slot within the wait allowed", retry_after=wait)
            self._sleep(wait)
