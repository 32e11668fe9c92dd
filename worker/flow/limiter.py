"""The global, adaptive call-rate limiter and in-flight cap: Lua on the Redis server's clock, shared by all workers.

GCRA spaces calls at the *effective* rate. Throttling from the seller cuts the effective rate multiplicatively
and makes every worker wait out the Retry-After together; each answered call raises it additively back towards
the configured ceiling (AIMD), so an unknown seller limit is found instead of hammered.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from worker.errors import RateLimited

# KEYS: tat, state hash. ARGV: ceiling rate, burst. Returns {allowed, wait_us}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cooldown = tonumber(redis.call('HGET', KEYS[2], 'cooldown_until') or '0')
if cooldown > now then return {0, cooldown - now} end
local ceiling = tonumber(ARGV[1])
local rate = tonumber(redis.call('HGET', KEYS[2], 'rate') or ARGV[1])
if rate > ceiling then rate = ceiling end
local emission = 1000000 / rate
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + emission
local allow_at = new_tat - burst * emission
if allow_at > now then return {0, math.ceil(allow_at - now)} end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
"""
# Throttled. ARGV: ceiling, floor, decrease factor, guard us, retry_after us (0 = one emission interval).
# Several workers throttled by the same burst count once: decreases are at least `guard` apart.
_PENALIZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ceiling, floor = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate = tonumber(redis.call('HGET', KEYS[2], 'rate') or ARGV[1])
if rate > ceiling then rate = ceiling end
local last = tonumber(redis.call('HGET', KEYS[2], 'last_decrease') or '0')
if now - last >= tonumber(ARGV[4]) then
  rate = math.max(floor, rate * tonumber(ARGV[3]))
  redis.call('HSET', KEYS[2], 'rate', tostring(rate), 'last_decrease', now)
  redis.call('HINCRBY', KEYS[2], 'decreases', 1)
end
local wait = tonumber(ARGV[5])
if wait <= 0 then wait = 1000000 / rate end
local until_us = now + wait
if until_us > tonumber(redis.call('HGET', KEYS[2], 'cooldown_until') or '0') then
  redis.call('HSET', KEYS[2], 'cooldown_until', string.format('%.0f', until_us))
end
redis.call('HINCRBY', KEYS[2], 'throttled', 1)
return tostring(rate)
"""
# Answered. ARGV: ceiling, step as a fraction of the current rate.
_REWARD = """
local ceiling = tonumber(ARGV[1])
local rate = tonumber(redis.call('HGET', KEYS[2], 'rate') or ARGV[1])
if rate < ceiling then
  rate = math.min(ceiling, rate * (1 + tonumber(ARGV[2])))
  redis.call('HSET', KEYS[2], 'rate', tostring(rate))
end
return tostring(rate)
"""
# In-flight cap with leases: a dead worker's slot expires. KEYS: zset. ARGV: cap, member, lease ms.
_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(first[2]) - now}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
return {1, 0}
"""


@dataclass(frozen=True)
class RateSpec:
    """The ceiling (configured rate), burst, and how the effective rate adapts below it."""

    per_second: float
    burst: int = 1
    floor: float = 0.05
    decrease: float = 0.85
    # Per answered call, as a fraction of the current rate: about +0.1 %/call, so a cycle is long and rare.
    increase: float = 0.001
    decrease_guard_s: float = 0.05
    max_in_flight: int = 0
    adaptive: bool = True


class RateLimiter:
    """acquire() returns once a call may go; it never waits longer than max_wait_s in-process."""

    def __init__(self, redis: Any, key: str, spec: RateSpec, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._redis = redis
        self._tat = key
        self._state = key + ":state"
        self._slots = key + ":in-flight"
        self.spec = spec
        self._acquire = redis.register_script(_ACQUIRE)
        self._penalize = redis.register_script(_PENALIZE)
        self._reward = redis.register_script(_REWARD)
        self._slot = redis.register_script(_SLOT)
        self._sleep = sleep

    def try_acquire(self) -> float:
        """0.0 when admitted, else the seconds to wait before asking again."""
        allowed, wait_us = self._acquire(keys=[self._tat, self._state], args=[self.spec.per_second, self.spec.burst])
        return 0.0 if int(allowed) == 1 else int(wait_us) / 1_000_000

    def acquire(self, max_wait_s: float = 10.0) -> None:
        """Wait (briefly, in-process) for a slot; beyond max_wait_s raise RateLimited so the task is deferred."""
        self._wait_for(self.try_acquire, max_wait_s, "global rate limit")

    def throttled(self, retry_after_s: float | None) -> float:
        """The seller said 'too fast': slow everyone down; returns the new effective rate."""
        if not self.spec.adaptive:
            return self.spec.per_second
        wait_us = round((retry_after_s or 0) * 1_000_000)
        rate = self._penalize(keys=[self._tat, self._state], args=[
            self.spec.per_second, self.spec.floor, self.spec.decrease,
            round(self.spec.decrease_guard_s * 1_000_000), wait_us])
        return float(rate)

    def answered(self) -> float:
        """A call went through: creep back towards the ceiling."""
        if not self.spec.adaptive:
            return self.spec.per_second
        return float(self._reward(keys=[self._tat, self._state], args=[self.spec.per_second, self.spec.increase]))

    def effective_rate(self) -> float:
        raw = self._redis.hget(self._state, "rate")
        return min(self.spec.per_second, float(raw)) if raw else self.spec.per_second

    def stats(self) -> dict[str, float]:
        raw: dict[str, str] = self._redis.hgetall(self._state)
        return {"rate": self.effective_rate(), "throttled": float(raw.get("throttled", 0)),
                "decreases": float(raw.get("decreases", 0)), "in_flight": float(self._redis.zcard(self._slots))}

    def slot(self, lease_s: float, max_wait_s: float = 10.0) -> Callable[[], None]:
        """Take an in-flight slot (no-op when uncapped); returns the function that gives it back."""
        if self.spec.max_in_flight <= 0:
            return lambda: None
        member = uuid.uuid4().hex
        lease_ms = round(lease_s * 1000)

        def attempt() -> float:
            ok, wait_ms = self._slot(keys=[self._slots], args=[self.spec.max_in_flight, member, lease_ms])
            return 0.0 if int(ok) == 1 else min(max(int(wait_ms), 1), 50) / 1000

        self._wait_for(attempt, max_wait_s, "in-flight cap")
        return lambda: self._redis.zrem(self._slots, member)

    def _wait_for(self, attempt: Callable[[], float], max_wait_s: float, what: str) -> None:
        deadline = time.monotonic() + max_wait_s
        while True:
            wait = attempt()
            if wait == 0.0:
                return
            if time.monotonic() + wait > deadline:
                raise RateLimited(f"{what}: no slot within {max_wait_s:.0f}s", retry_after=wait)
            self._sleep(wait)
