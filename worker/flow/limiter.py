"""The global, adaptive call-rate limiter and in-flight cap: Lua on the Redis server's clock, shared by all workers.

GCRA spaces calls at the *effective* rate. Throttling from the seller cuts the effective rate multiplicatively
and makes every worker wait out the Retry-After together; each answered call raises it additively back towards
the configured ceiling (AIMD), so an unknown seller limit is found instead of hammered.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from worker.errors import RateLimited
from worker.keys import Keys
from worker.messages import QUEUES
from worker.seams.store import Store

# A chunk that steps aside for event work comes back this soon (its progress is kept).
YIELD_S = 1.0


class YieldToEvents(RateLimited):
    """Event work waits for a worker slot or a call: a nightly or backfill chunk steps aside (deferred)."""


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
    # A seller's Retry-After is obeyed up to this; beyond it (or unreadable) the fleet waits this long.
    max_retry_after_s: float = 300.0


class RateLimiter:
    """acquire() returns once a call may go; it never waits longer than max_wait_s in-process."""

    def __init__(self, store: Store, keys: Keys, spec: RateSpec, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._store = store
        self._tat = keys.ratelimit()
        self._state = keys.ratelimit_state()
        self._slots = keys.ratelimit_slots()
        self._urgent = keys.ratelimit_urgent()
        self._events_queue = QUEUES["events"]
        self.spec = spec
        self._acquire = store.script("flow", "limiter_acquire")
        self._penalize = store.script("flow", "limiter_penalize")
        self._reward = store.script("flow", "limiter_reward")
        self._slot = store.script("flow", "limiter_slot")
        self._sleep = sleep

    def try_acquire(self, urgent: bool = False, member: str = "") -> float:
        """0.0 when admitted, else the seconds to wait before asking again; YieldToEvents for a call that is
        not urgent while event work waits."""
        allowed, wait_us = self._acquire(
            [self._tat, self._state, self._urgent, self._events_queue],
            [self.spec.per_second, self.spec.burst, "1" if urgent else "0", member])
        if int(allowed) == 2:
            raise YieldToEvents("event work is waiting: this chunk steps aside", retry_after=YIELD_S)
        return 0.0 if int(allowed) == 1 else int(wait_us) / 1_000_000

    def acquire(self, max_wait_s: float = 10.0, *, urgent: bool = False) -> None:
        """Wait (briefly, in-process) for a slot; beyond max_wait_s raise RateLimited so the task is deferred.

        An urgent (event) call goes before every other: while it waits, and while event chunks wait in their
        queue, other calls raise YieldToEvents at once, so their chunk frees its worker slot too.
        """
        member = uuid.uuid4().hex if urgent else ""
        try:
            self._wait_for(lambda: self.try_acquire(urgent, member), max_wait_s, "global rate limit")
        finally:
            if urgent:
                self._store.zrem(self._urgent, member)

    def throttled(self, retry_after_s: float | None) -> float:
        """The seller said 'too fast': slow everyone down; returns the new effective rate."""
        if not self.spec.adaptive:
            return self.spec.per_second
        wait_us = round(self.bounded_wait(retry_after_s) * 1_000_000)
        rate = self._penalize([self._tat, self._state], [
            self.spec.per_second, self.spec.floor, self.spec.decrease,
            round(self.spec.decrease_guard_s * 1_000_000), wait_us])
        return float(rate)

    def answered(self) -> float:
        """A call went through: creep back towards the ceiling."""
        if not self.spec.adaptive:
            return self.spec.per_second
        return float(self._reward([self._tat, self._state], [self.spec.per_second, self.spec.increase]))

    def bounded_wait(self, retry_after_s: float | None) -> float:
        """A seller's Retry-After in seconds, kept within [0, max_retry_after_s]; 0 when absent."""
        if retry_after_s is None or math.isnan(retry_after_s):
            return 0.0
        return min(max(0.0, retry_after_s), self.spec.max_retry_after_s)

    def effective_rate(self) -> float:
        raw = self._store.hget(self._state, "rate")
        return min(self.spec.per_second, float(raw)) if raw else self.spec.per_second

    def stats(self) -> dict[str, float]:
        raw: dict[str, str] = self._store.hgetall(self._state)
        return {"rate": self.effective_rate(), "throttled": float(raw.get("throttled", 0)),
                "decreases": float(raw.get("decreases", 0)), "in_flight": float(self._store.zcard(self._slots))}

    def slot(self, lease_s: float, max_wait_s: float = 10.0) -> Callable[[], None]:
        """Take an in-flight slot (no-op when uncapped); returns the function that gives it back."""
        if self.spec.max_in_flight <= 0:
            return lambda: None
        member = uuid.uuid4().hex
        lease_ms = round(lease_s * 1000)

        def attempt() -> float:
            ok, wait_ms = self._slot([self._slots], [self.spec.max_in_flight, member, lease_ms])
            return 0.0 if int(ok) == 1 else min(max(int(wait_ms), 1), 50) / 1000

        self._wait_for(attempt, max_wait_s, "in-flight cap")
        return lambda: self._store.zrem(self._slots, member)

    def _wait_for(self, attempt: Callable[[], float], max_wait_s: float, what: str) -> None:
        deadline = time.monotonic() + max_wait_s
        while True:
            wait = attempt()
            if wait == 0.0:
                return
            if time.monotonic() + wait > deadline:
                raise RateLimited(f"{what}: no slot within {max_wait_s:.0f}s", retry_after=wait)
            self._sleep(wait)
