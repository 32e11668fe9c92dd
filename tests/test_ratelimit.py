"""The global limiter on a real Redis: exact spacing across processes, adaptation, in-flight cap."""

from __future__ import annotations

import json
import multiprocessing
import signal
import threading
import time
from collections import Counter

import pytest
import redis

from sandbox.procs import wait_until
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET
from tests.faults import check_invariants, drive_to_completion, live_samples, upload_samples
from worker.errors import RateLimited
from worker.flow.limiter import AUTO_MIN, RESERVE_AHEAD_S, RateLimiter, RateSpec, YieldToEvents, auto_cap
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
        limiter.done("", 0.1)
    assert after < limiter.effective_rate() <= 50


def test_throttles_from_one_burst_count_once(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(50, decrease_guard_s=5))
    rates = [limiter.throttled(None) for _ in range(5)]
    assert rates == [pytest.approx(42.5)] * 5


def test_retry_after_makes_every_worker_wait(clean_stack: Stack) -> None:
    one = RateLimiter(_client(clean_stack), Keys(), RateSpec(1000))
    other = RateLimiter(_client(clean_stack), Keys(), RateSpec(1000))
    one.throttled(0.5)
    placed, wait = other.reserve()
    assert placed and 0.3 < wait <= 0.5, "no place in line comes before the end of the Retry-After"


def test_a_place_taken_before_a_throttle_does_not_call_during_it(clean_stack: Stack) -> None:
    one = RateLimiter(_client(clean_stack), Keys(), RateSpec(2))
    one.acquire()  # the next place is half a second away: whoever asks now sleeps to it
    throttles: list[float] = []

    def sleep(seconds: float) -> None:
        if not throttles:  # the seller says 'too fast' while this caller sleeps to its place
            throttles.append(one.throttled(1.0))
        time.sleep(seconds)

    other = RateLimiter(_client(clean_stack), Keys(), RateSpec(2), sleep=sleep)
    started = time.monotonic()
    other.admit(max_wait_s=3).release()
    assert throttles and time.monotonic() - started >= 0.95, "it called inside the Retry-After"


def test_in_flight_cap_and_dead_slots_come_back(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(1000, max_in_flight=2))
    limiter.admit(lease_s=60)
    limiter.admit(lease_s=0.3)  # a worker that will die holding it
    with pytest.raises(RateLimited):
        limiter.admit(lease_s=60, max_wait_s=0.05)
    got = limiter.admit(lease_s=60, max_wait_s=2.0)  # the dead slot's lease expires
    got.release()
    assert limiter.stats()["in_flight"] == 1


def test_a_call_admitted_at_once_says_so_and_one_that_waited_for_its_turn_does_not(clean_stack: Stack) -> None:
    # What lets a chunk send its next call alongside (worker/flow/pipeline.py): a place within the horizon at the
    # first ask and a slot at once.
    spaced = RateLimiter(_client(clean_stack), Keys(), RateSpec(1 / (RESERVE_AHEAD_S + 0.5)))
    first = spaced.admit(max_wait_s=10)
    first.release()
    assert first.prompt
    second = spaced.admit(max_wait_s=10)
    second.release()
    assert not second.prompt, "its place was beyond the horizon: it came back for it"
    capped = RateLimiter(_client(clean_stack), Keys(), RateSpec(1000, max_in_flight=1))
    first = capped.admit(max_wait_s=10)
    threading.Timer(0.2, first.release).start()
    assert not capped.admit(max_wait_s=10).prompt, "it waited for a slot"


def test_a_cancelled_wait_in_line_ends_before_its_place_comes_and_takes_no_slot(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(0.1))  # places 10 s apart
    limiter.admit(max_wait_s=10)
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(RateLimited, match="wait ends"):
        limiter.admit(max_wait_s=30, cancel=cancel)
    assert time.monotonic() - started < 9, "it waited for its place"
    assert limiter.stats()["in_flight"] == 1


def _commands(stack: Stack) -> Counter[str]:
    stats = stack.redis_client().info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def test_a_caller_waiting_for_a_slot_is_woken_by_its_release_and_does_not_poll(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(1000, max_in_flight=1))
    held = limiter.admit(lease_s=60)
    before = _commands(clean_stack)
    got: list[float] = []
    waiter = threading.Thread(target=lambda: (limiter.admit(max_wait_s=8, lease_s=60), got.append(time.monotonic())))
    waiter.start()
    wait_until(lambda: clean_stack.redis_client().zcard(Keys().ratelimit_waiting()) == 1, 5, "the caller to wait")
    time.sleep(0.5)  # the quiet half second under test: a polling waiter would ask ten times in it
    released = time.monotonic()
    held.release()
    waiter.join(5)
    assert got and got[0] - released < 0.5, "the waiter was woken by the release, not by the lease lapsing"
    used = _commands(clean_stack) - before
    # A script the server does not know yet answers NOSCRIPT and is loaded and sent again: not the limiter's cost.
    used["evalsha"] -= used["script|load"]
    # reserve, go (full), BLPOP, done (the release), go (admitted); the rest are INFO and the test's ZCARDs
    assert used["evalsha"] == 4 and used["blpop"] == 1, used


def _callers(stack: Stack, rate: float, threads: int, calls_each: int) -> tuple[int, Counter[str]]:
    """`threads` callers making `calls_each` calls each at `rate`: the calls, and the Redis commands they cost."""
    before = _commands(stack)

    def caller() -> None:
        limiter = RateLimiter(_client(stack), Keys(), RateSpec(rate, max_in_flight=0))
        for _ in range(calls_each):
            limiter.admit(max_wait_s=30).release()

    pool = [threading.Thread(target=caller) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    used = _commands(stack) - before
    # A script the server does not know yet answers NOSCRIPT and is loaded and sent again: not the limiter's cost.
    used["evalsha"] -= used["script|load"]
    return threads * calls_each, used


def test_the_commands_per_call_do_not_grow_with_the_threads_waiting(clean_stack: Stack) -> None:
    calls, used = _callers(clean_stack, rate=40.0, threads=16, calls_each=5)
    # 80 calls at 40/s by 16 threads: 2 s of waiting in line; each call reserves, goes and is done, nothing more
    assert used["evalsha"] <= calls * 3, used
    assert used["get"] <= calls + 2, used  # the TAT, read once per place taken


def test_callers_beyond_the_horizon_come_back_one_place_apart_not_all_at_once(clean_stack: Stack) -> None:
    # A line 4 s deep: half the callers find no place within 2 s.
    calls, used = _callers(clean_stack, rate=10.0, threads=40, calls_each=2)
    # reserve, go, done a call, and about one return from the waiting room for the callers who had to wait
    assert used["evalsha"] <= calls * 4, used


def test_the_in_flight_cap_follows_the_rate_and_the_seller_latency(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(20))
    assert limiter.in_flight_cap() == auto_cap(20, None) == 60  # a 2 s seller assumed until one answers
    for _ in range(200):
        limiter.done("", 1.0)
    assert limiter.stats()["latency_s"] == pytest.approx(1.0, abs=0.01)
    assert limiter.in_flight_cap() == 30  # 20 calls/s x 1 s, with half again for the spread
    fast = RateLimiter(_client(clean_stack), Keys(), RateSpec(50, listing="a fast seller"))
    for _ in range(200):
        fast.done("", 0.1)
    assert fast.in_flight_cap() == AUTO_MIN == 16  # the least cap: 50/s x 0.1 s x 1.5 would be 8
    permits = [fast.admit(max_wait_s=5, lease_s=60) for _ in range(16)]
    with pytest.raises(RateLimited):
        fast.admit(max_wait_s=0.6, lease_s=60)
    for p in permits:
        p.release()


def test_a_seller_latency_is_learned_per_listing(clean_stack: Stack) -> None:
    a = RateLimiter(_client(clean_stack), Keys(), RateSpec(100, listing="a /api/tools/a"))
    b = RateLimiter(_client(clean_stack), Keys(), RateSpec(100, listing="b /api/tools/b"))
    for _ in range(100):
        a.done("", 0.5)
    assert a.in_flight_cap() == 75  # 100/s x 0.5 s x 1.5
    assert b.in_flight_cap() == 300  # nothing learned for b: a 2 s seller assumed


def test_event_calls_queue_ahead_of_other_work(clean_stack: Stack) -> None:
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(10.0))
    places = 0
    while limiter.reserve()[0]:  # other work takes every place within its horizon ...
        places += 1
    assert places == pytest.approx(RESERVE_AHEAD_S * 10, abs=1)
    placed, wait = limiter.reserve(urgent=True, horizon_s=10)  # ... an event call still gets one right after
    assert placed and wait <= RESERVE_AHEAD_S + 0.2


def test_event_chunks_waiting_in_their_queue_make_other_calls_yield(clean_stack: Stack) -> None:
    client = clean_stack.redis_client()
    limiter = RateLimiter(_client(clean_stack), Keys(), RateSpec(100.0, burst=10))
    client.rpush(QUEUES["events"], "an event chunk no worker has fetched yet")
    with pytest.raises(YieldToEvents):
        limiter.reserve()
    assert limiter.reserve(urgent=True) == (True, 0.0)  # the event chunk's own call is admitted
    client.delete(QUEUES["events"])
    assert limiter.reserve() == (True, 0.0)


def test_config_says_what_the_rate_needs_in_flight_and_when_the_threads_fall_short(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    clean_stack.start_worker(concurrency=4)
    client = clean_stack.redis_client()
    wait_until(lambda: client.hlen(Keys().fleet_enforced()) == 1, 30, "the worker to say what it runs")
    out = irlive("config", env={"IRLIVE_RATE_LIMIT_PER_S": "20"}).stdout
    assert "IRLIVE_MAX_IN_FLIGHT" in out and " auto " in out
    assert ("20 calls/s x the seller's latency (2 s assumed until the seller's first answers) needs 40 calls in "
            "flight; the cap is 60 (auto)") in out
    assert ("the 1 running workers have 4 threads, which carry up to 20 calls at once (a chunk's 5 together), "
            "fewer than 40: start more workers or raise --concurrency") in out
    # Once answers taught it a 0.5 s seller, the same rate needs 10: the 4 threads carry them.
    client.hset(Keys().ratelimit_state(), "latency_ms", "500.0")
    out = irlive("config", env={"IRLIVE_RATE_LIMIT_PER_S": "20"}).stdout
    assert "(learned 0.50 s) needs 10 calls in flight; the cap is 16 (auto)" in out
    assert "up to 20 calls at once (a chunk's 5 together)" in out and "fewer than" not in out


def test_a_warm_shutdown_hands_back_a_chunk_waiting_in_line_instead_of_waiting_its_turn(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = live_samples(30, "line")
    upload_samples(clean_stack, samples)
    slow = {"IRLIVE_RATE_LIMIT_PER_S": "0.25", "IRLIVE_TOKEN_POOL_SIZE": "0"}  # one place in line every 4 s
    first = clean_stack.start_worker(extra_env=slow, concurrency=2)
    run_id = json.loads(irlive("scan", f"s3://{IN_BUCKET}/line", "--json").stdout)["run_id"]
    client = clean_stack.redis_client()

    def spent() -> int:
        return int(client.hget(Keys().wallet_totals(), "spent") or 0)

    wait_until(lambda: spent() >= 1, 60, "the chunk's first call")
    # SIGTERM: Celery's warm shutdown waits for the running chunk. Its next call's place is 4 s away; the chunk
    # gives up its wait and goes back to the queue instead of making (and paying for) its other two calls first.
    clean_stack.kill_worker(first, signal.SIGTERM, timeout=60)
    assert spent() == 1, "the stopping worker paid for calls it waited in line for"
    clean_stack.start_worker(extra_env={"IRLIVE_RATE_LIMIT_PER_S": "5"}, concurrency=2)
    drive_to_completion(clean_stack, run_id, deadline_s=120)
    assert check_invariants(clean_stack, run_id, samples) == []
    assert spent() == 3
