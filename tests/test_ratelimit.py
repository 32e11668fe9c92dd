"""The global limiter on a real Redis: exact spacing across processes, adaptation, in-flight cap."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis

from sandbox.stack import Stack
from worker.errors import RateLimited
from worker.flow.limiter import RateLimiter, RateSpec, YieldToEvents
from worker.keys import Keys
from worker.messages import QUEUES
from worker.seams.store import Store

pytestmark = pytest.mark.integration


def _client(stack: Stack) -> Store:
    return Store(redis.Redis.from_url(stack.redis_url, decode_responses=True))


def _hammer(url: str, rate: float, seconds: float, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    limiter = RateLimiter(Store(redis.Redis.from_url(url, decode_responses=True)), Keys(), RateSpec(rate))
    stamps = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            limiter.acquire(max_wait_s=seconds)
        except RateLimited:
            break
        stamps.append(time.time())
    out.put(stamps)


def test_four_processes_share_one_rate(clean_stack: Stack) -> None:
    rate, seconds = 20.0, 3.0
    out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    procs = [multiprocessing.Process(target=_hammer, args=(clean_stack.redis_url, rate, seconds, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    stamps = sorted(t for _ in procs for t in out.get(timeout=30))
    for p in procs:
        p.join(10)
    # Processes start at slightly different moments, so judge the rate over the span actually covered.
    achieved = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert rate * 0.9 <= achieved <= rate * 1.03
    worst_window = max(sum(1 for t in stamps if s <= t < s + 1.0) for s in stamps)
    assert worst_window <= rate + 1


def test_throttling_cuts_the_rate_and_answers_raise_it_back(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(50, decrease_guard_s=0))
    assert limiter.effective_rate() == 50
    after = limiter.throttled(None)
    assert after == pytest.approx(50 * 0.85)
    for _ in range(200):
        limiter.answered()
    assert after < limiter.effective_rate() <= 50


def test_throttles_from_one_burst_count_once(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(50, decrease_guard_s=5))
    rates = [limiter.throttled(None) for _ in range(5)]
    assert rates == [pytest.approx(42.5)] * 5


def test_retry_after_makes_every_worker_wait(clean_stack: Stack) -> None:
    one = RateLimiter(_client(clean_stack), Keys(), RateSpec(1000))
    other = RateLimiter(_client(clean_stack), Keys(), RateSpec(1000))
    one.throttled(0.5)
    wait = other.try_acquire()
    assert 0.3 < wait <= 0.5


def test_in_flight_cap_and_dead_slots_come_back(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(1000, max_in_flight=2))
    limiter.slot(lease_s=60)
    release = limiter.slot(lease_s=0.3)  # a worker that will die holding it
    with pytest.raises(RateLimited):
        limiter.slot(lease_s=60, max_wait_s=0.05)
    del release
    got = limiter.slot(lease_s=60, max_wait_s=2.0)  # the dead slot's lease expires
    got()
    assert limiter.stats()["in_flight"] == 1


def test_event_calls_go_first_and_other_calls_yield_to_them(clean_stack: Stack) -> None:
    store = _client(clean_stack)
    limiter = RateLimiter(store, Keys(), RateSpec(1.0, burst=1))
    limiter.acquire(max_wait_s=1)  # the one call of this second: whoever asks next must wait
    assert limiter.try_acquire(urgent=True, member="ev-1") > 0  # an event call now waits its turn ...
    with pytest.raises(YieldToEvents):  # ... and while it waits, other work steps aside at once
        limiter.try_acquire()
    limiter.acquire(max_wait_s=3, urgent=True)  # the event caller is admitted when the next slot comes
    store.zrem(Keys().ratelimit_urgent(), "ev-1")  # the first caller gave up (its registration also lapses)
    assert limiter.try_acquire() > 0  # no urgent caller left: others wait, they are not told to yield


def test_event_chunks_waiting_in_their_queue_make_other_calls_yield(clean_stack: Stack) -> None:
    client = clean_stack.redis_client()
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(100.0, burst=10))
    client.rpush(QUEUES["events"], "an event chunk no worker has fetched yet")
    with pytest.raises(YieldToEvents):
        limiter.try_acquire()
    assert limiter.try_acquire(urgent=True, member="ev") == 0.0  # the event chunk's own call is admitted
    client.delete(QUEUES["events"])
    assert limiter.try_acquire() == 0.0
