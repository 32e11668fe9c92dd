"""The global, adaptive call-rate limiter and in-flight cap: Lua on the Redis server's clock, shared by all workers.

GCRA spaces calls at the *effective* rate. Throttling from the seller cuts the effective rate multiplicatively
and makes every worker wait out the Retry-After together; each answered call raises it additively back towards
the configured ceiling (AIMD), so an unknown seller limit is found instead of hammered.

Waiting costs no Redis traffic: a caller is given its place in line (the time it may call at) and sleeps until
then; a caller with no place within its horizon is given a return time one place after the previous one (a
waiting room), and a caller waiting for an in-flight slot blocks on a list that a slot given back wakes (BLPOP).
So a call costs three scripts (reserve, go, done), and one more for a caller who had to come back, however many
threads wait.

The in-flight cap follows Little's law unless set: in flight = rate x latency. The limiter learns the seller's
latency (an average over answered calls, per listing) and allows the ceiling rate times that, with headroom, so
raising the rate limit is the one setting a user changes. Hand-written: no library limits a fleet on a shared
Redis with a learned concurrency and blocking waiters (dramatiq's limiters poll).
"""

from __future__ import annotations

import math
import threading
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
# Calls other than event calls take a place at most this far ahead: an event call waits behind no more.
RESERVE_AHEAD_S = 2.0
# The automatic in-flight cap: ceiling rate x learned latency x headroom, within these bounds. The least is the
# old fixed cap: calls that hang until their timeout hold slots their answered latency never asked for, and at
# low rates a few of them must not stop the rest.
AUTO_HEADROOM = 1.5
AUTO_MIN = 16
AUTO_MAX = 512
# The latency assumed for a seller until its first answers are in.
ASSUMED_LATENCY_MS = 2000.0
# The weight of each new answer's latency in the learned average.
LATENCY_WEIGHT = 0.05
# A caller waiting in line or for an in-flight slot looks for a warm shutdown this often.
STOP_CHECK_S = 2.0


class YieldToEvents(RateLimited):
    """Event work waits for a worker slot: a nightly or backfill chunk steps aside (deferred)."""


@dataclass(frozen=True)
class RateSpec:
    """The ceiling (configured rate), burst, the in-flight cap, and how the effective rate adapts below it."""

    per_second: float
    burst: int = 1
    floor: float = 0.05
    decrease: float = 0.85
    # Per answered call, as a fraction of the current rate: about +0.1 %/call, so a cycle is long and rare.
    increase: float = 0.001
    decrease_guard_s: float = 0.05
    # Calls in flight across the fleet: None follows the rate and the seller's latency; 0 is no cap.
    max_in_flight: int | None = None
    adaptive: bool = True
    # A seller's Retry-After is obeyed up to this; beyond it (or unreadable) the fleet waits this long.
    max_retry_after_s: float = 300.0
    # The seller (listing) whose latency is learned: each its own.
    listing: str = ""

    @property
    def latency_field(self) -> str:
        return f"latency_ms:{self.listing}" if self.listing else "latency_ms"


def auto_cap(rate: float, latency_ms: float | None) -> int:
    """The in-flight cap Little's law asks for at `rate` calls/s and this latency (as limiter_go.lua has it)."""
    latency = ASSUMED_LATENCY_MS if latency_ms is None else latency_ms
    return max(AUTO_MIN, min(AUTO_MAX, math.ceil(rate * latency / 1000 * AUTO_HEADROOM)))


class Permit:
    """An admitted call: `answered(latency)` once the seller answered, then `release()` (always) gives its
    in-flight slot back and teaches the limiter what the call took."""

    def __init__(self, limiter: RateLimiter, member: str, prompt: bool = False) -> None:
        self._limiter = limiter
        self._member = member
        self._latency_s: float | None = None
        # Placed in line within the horizon at the first ask and given a slot at once: the fleet has room for
        # more calls than it is making (a chunk may send its next call alongside this one).
        self.prompt = prompt

    @property
    def member(self) -> str:
        """Its in-flight slot's name (a chunk's lease heartbeat renews the slot while the call runs)."""
        return self._member

    def answered(self, latency_s: float) -> None:
        self._latency_s = latency_s

    def release(self) -> float:
        """Returns the effective rate after it."""
        return self._limiter.done(self._member, self._latency_s)


class RateLimiter:
    """admit() returns once a call may go; it never waits longer than max_wait_s in-process."""

    def __init__(self, store: Store, keys: Keys, spec: RateSpec, *,
                 sleep: Callable[[float], None] = time.sleep,
                 stopping: threading.Event | None = None) -> None:
        self._store = store
        self._tat = keys.ratelimit()
        self._returns = keys.ratelimit_returns()
        self._state = keys.ratelimit_state()
        self._slots = keys.ratelimit_slots()
        self._waiting = keys.ratelimit_waiting()
        self._freed = keys.ratelimit_freed()
        self._events_queue = QUEUES["events"]
        self.spec = spec
        self._reserve = store.script("flow", "limiter_reserve")
        self._go = store.script("flow", "limiter_go")
        self._done = store.script("flow", "limiter_done")
        self._penalize = store.script("flow", "limiter_penalize")
        self._sleep = sleep
        # Set when the worker begins a warm shutdown: a call waiting in line gives up its wait (its chunk is
        # deferred to another worker) instead of holding the shutdown for up to max_wait_s per call.
        self._stopping = stopping

    def reserve(self, urgent: bool = False, horizon_s: float = RESERVE_AHEAD_S,
                patience_s: float = 60.0) -> tuple[bool, float]:
        """Take a place in line within horizon_s: (True, seconds until it comes), or (False, seconds after which
        to ask again: a return time, taken if within patience_s); YieldToEvents for a call that is not urgent
        while event chunks wait in their queue."""
        state, wait_us = self._reserve([self._tat, self._state, self._events_queue, self._returns],
                                       [self.spec.per_second, self.spec.burst, "1" if urgent else "0",
                                        round(horizon_s * 1_000_000), round(patience_s * 1_000_000)])
        if int(state) == 2:
            raise YieldToEvents("event work is waiting: this chunk steps aside", retry_after=YIELD_S)
        return int(state) == 1, int(wait_us) / 1_000_000

    def admit(self, max_wait_s: float = 10.0, *, urgent: bool = False, lease_s: float = 60.0,
              cancel: threading.Event | None = None) -> Permit:
        """Wait (in-process, at most max_wait_s) for a place in line and an in-flight slot; beyond it raise
        RateLimited so the task is deferred. An event call may queue up to max_wait_s ahead, others up to
        RESERVE_AHEAD_S: an event call goes after at most that much other work. A set `cancel` ends the wait
        (RateLimited) within STOP_CHECK_S, as a warm shutdown does."""
        deadline = time.monotonic() + max_wait_s
        member = uuid.uuid4().hex
        prompt = True
        while True:
            left = deadline - time.monotonic()
            placed, wait = self.reserve(urgent, max(0.0, left if urgent else min(left, RESERVE_AHEAD_S)),
                                        max(0.0, left))
            if not placed:
                # Others hold the places within the horizon: come back at the return time given (one emission
                # after the previous caller's), when a place is likely free.
                prompt = False
                self._give_up_after(wait, deadline, "global rate limit", max_wait_s)
                self._pause(wait, cancel)
                continue
            if wait > 0:
                self._pause(wait, cancel)
            taken = self._take_slot(member, lease_s, deadline, max_wait_s, cancel)
            if taken is not None:
                return Permit(self, member, prompt and taken)
            prompt = False

    def _take_slot(self, member: str, lease_s: float, deadline: float, max_wait_s: float,
                   cancel: threading.Event | None = None) -> bool | None:
        """At the caller's place in line: once it holds an in-flight slot, whether it got one at once (True) or
        waited for one (False); None when the seller said 'too fast' meanwhile (the caller takes a new place
        after the cooldown)."""
        cap = "auto" if self.spec.max_in_flight is None else str(self.spec.max_in_flight)
        registered = False
        while True:
            answer = self._go([self._state, self._slots, self._waiting], [
                cap, member, round(lease_s * 1000), self.spec.per_second, self.spec.latency_field,
                ASSUMED_LATENCY_MS, AUTO_HEADROOM, AUTO_MIN, AUTO_MAX, "1" if registered else "0"])
            if int(answer[0]) == 1:
                return not registered
            wait = int(answer[1]) / 1000
            if answer[2] == "cooldown":
                self._give_up_after(wait, deadline, "the seller's Retry-After", max_wait_s)
                self._pause(wait, cancel)
                return None
            registered = True
            left = deadline - time.monotonic()
            if left <= 0:
                self._store.zrem(self._waiting, member)
                raise RateLimited(f"in-flight cap: no slot within {max_wait_s:.0f}s", retry_after=wait)
            # Woken by a slot given back, or when the first slot's lease lapses, or at the deadline (or, to notice a
            # warm shutdown, within STOP_CHECK_S).
            self._stop_check(cancel)
            self._store.blpop([self._freed], timeout=max(0.01, min(wait, left, STOP_CHECK_S)))

    def done(self, member: str, latency_s: float | None) -> float:
        """A call ended (member: its slot, '' for none): the slot back, and an answer's latency learned."""
        latency = "" if latency_s is None else f"{latency_s * 1000:.1f}"
        step = str(self.spec.increase) if self.spec.adaptive else ""
        rate = self._done([self._state, self._slots, self._waiting, self._freed],
                          [member, latency, self.spec.latency_field, LATENCY_WEIGHT, self.spec.per_second, step])
        return min(self.spec.per_second, float(rate))

    def acquire(self, max_wait_s: float = 10.0, *, urgent: bool = False) -> None:
        """Admission for a call that holds no in-flight slot afterwards (a probe, a test): the rate alone."""
        self.admit(max_wait_s, urgent=urgent).release()

    def throttled(self, retry_after_s: float | None) -> float:
        """The seller said 'too fast': slow everyone down; returns the new effective rate."""
        if not self.spec.adaptive:
            return self.spec.per_second
        wait_us = round(self.bounded_wait(retry_after_s) * 1_000_000)
        rate = self._penalize([self._tat, self._state], [
            self.spec.per_second, self.spec.floor, self.spec.decrease,
            round(self.spec.decrease_guard_s * 1_000_000), wait_us])
        return float(rate)

    def bounded_wait(self, retry_after_s: float | None) -> float:
        """A seller's Retry-After in seconds, kept within [0, max_retry_after_s]; 0 when absent."""
        if retry_after_s is None or math.isnan(retry_after_s):
            return 0.0
        return min(max(0.0, retry_after_s), self.spec.max_retry_after_s)

    def effective_rate(self) -> float:
        return self._rate(self._store.hget(self._state, "rate"))

    def _rate(self, raw: str | None) -> float:
        """The effective rate from the state's `rate` field: never above the ceiling, the ceiling until set."""
        return min(self.spec.per_second, float(raw)) if raw else self.spec.per_second

    def in_flight_cap(self, latency_ms: str | None = None) -> int:
        """The in-flight cap now (0: none): the fixed one, or Little's law on the latency learned so far (read
        here unless the caller has read it)."""
        if self.spec.max_in_flight is not None:
            return self.spec.max_in_flight
        raw = latency_ms if latency_ms is not None else self._store.hget(self._state, self.spec.latency_field)
        return auto_cap(self.spec.per_second, float(raw) if raw else None)

    def stats(self) -> dict[str, float]:
        raw: dict[str, str] = self._store.hgetall(self._state)
        latency = raw.get(self.spec.latency_field)
        return {"rate": self._rate(raw.get("rate")), "throttled": float(raw.get("throttled", 0)),
                "decreases": float(raw.get("decreases", 0)), "in_flight": float(self._store.zcard(self._slots)),
                "in_flight_cap": float(self.in_flight_cap(latency or "")),
                "latency_s": float(latency) / 1000 if latency else float("nan")}

    def _pause(self, seconds: float, cancel: threading.Event | None = None) -> None:
        """Sleep, unless the worker is stopping (or the caller cancels): then the call gives up its wait
        (RateLimited, deferred).

        Slices of sleep looking at the flag, not Event.wait(timeout): that waits on the wall clock's absolute
        time, which a worker whose clock is faked (libfaketime in tests/test_money_core.py) misreads by minutes."""
        if self._stopping is None and cancel is None:
            self._sleep(seconds)
            return
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._stop_check(cancel)
            self._sleep(min(left, STOP_CHECK_S))
        self._stop_check(cancel)

    def _stop_check(self, cancel: threading.Event | None = None) -> None:
        if self._stopping is not None and self._stopping.is_set():
            raise RateLimited("the worker is stopping: the chunk goes back to the queue", retry_after=1.0)
        if cancel is not None and cancel.is_set():
            raise RateLimited("the chunk stopped paying: this call's wait ends", retry_after=1.0)

    @staticmethod
    def _give_up_after(wait: float, deadline: float, what: str, max_wait_s: float) -> None:
        if time.monotonic() + wait > deadline:
            raise RateLimited(f"{what}: no slot within {max_wait_s:.0f}s", retry_after=wait)
