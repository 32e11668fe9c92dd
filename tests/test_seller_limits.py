"""What a seller says about pace cannot stall or overfill the fleet: Retry-After is capped and parsed in every
form, and one pool keeper buys at a time however slow a purchase is (money-core holes 6 and 7)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from redis import Redis

from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET
from tests.faults import check_invariants, drive_to_completion, live_samples, upload_samples
from worker.keys import Keys
from worker.seams.marketplace import _retry_after


def _response(value: str) -> httpx.Response:
    return httpx.Response(429, headers={"Retry-After": value})


def test_retry_after_is_read_as_seconds_or_an_http_date_and_never_raises() -> None:
    assert _retry_after(_response("2.5")) == 2.5
    assert _retry_after(_response("100000000")) == 1e8, "huge but finite: the limiter caps it"
    assert _retry_after(_response("1e400")) == 1e12, "not infinity: arithmetic on it must not overflow"
    assert _retry_after(_response("-3")) is None and _retry_after(_response("soon")) is None
    in_a_minute = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 55 <= (_retry_after(_response(in_a_minute)) or 0) <= 61
    assert _retry_after(_response("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0, "a date in the past: go now"


@pytest.mark.parametrize("header", ["100000000", "1e400", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_huge_retry_after_cannot_stall_the_fleet(clean_stack: Stack, irlive: IrliveRunner, header: str) -> None:
    samples = live_samples(60, "retry", seed=11)
    upload_samples(clean_stack, samples)
    # The seller allows one call a second and asks throttled callers to come back in three years.
    clean_stack.sandbox_config(rate_limit_per_s=1.0, rate_burst=1, retry_after=header)
    env = {"IRLIVE_MAX_RETRY_AFTER_S": "2", "IRLIVE_RATE_LIMIT_PER_S": "20"}
    clean_stack.start_worker(extra_env=env, concurrency=4)

    done = irlive("scan", f"s3://{IN_BUCKET}/retry", "--json", env=env)
    run_id = json.loads(done.stdout)["run_id"]
    started = time.monotonic()
    drive_to_completion(clean_stack, run_id, deadline_s=120, env=env)
    elapsed = time.monotonic() - started
    assert check_invariants(clean_stack, run_id, samples, strict_once=True, env=env) == []
    assert clean_stack.sandbox_ledger()["throttled"] > 0, "the seller did throttle"
    print(f"Retry-After {header!r}: run done in {elapsed:.1f}s")


def test_one_pool_keeper_buys_at_a_time_however_slow_the_purchase(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = live_samples(100, "pool", seed=12)
    upload_samples(clean_stack, samples)
    # A purchase takes 3 s: three times the old keeper lock's lifetime.
    clean_stack.sandbox_config(payment_latency_ms=3000, latency_ms=200)
    env = {"IRLIVE_TOKEN_POOL_SIZE": "2", "IRLIVE_TOKEN_POOL_LOW": "1"}
    for _ in range(3):
        clean_stack.start_worker(extra_env=env, concurrency=2)

    keys = Keys()
    redis = Redis.from_url(clean_stack.redis_url, decode_responses=True)
    # Purchases for the pool in flight at once, sampled on every poll of the run (a purchase lasts 3 s). Calls
    # that find the pool empty buy for themselves (requests with a run id), as many at once as they like; and
    # a token one of them gives back joins the pool, so the pool's size after the run proves nothing.
    most_at_once = 0

    def sample(_elapsed: float, _snap: dict[str, str]) -> None:
        nonlocal most_at_once
        open_requests = redis.zrange(keys.requests(), 0, -1)
        for_pool = [r for r in open_requests if redis.hget(keys.payment(r), "run_id") == ""]
        most_at_once = max(most_at_once, len(for_pool))

    run_id = json.loads(irlive("scan", f"s3://{IN_BUCKET}/pool", "--json").stdout)["run_id"]
    drive_to_completion(clean_stack, run_id, deadline_s=240, poll_s=0.1, during=sample)
    clean_stack.stop_workers()
    redis.close()
    wallet = json.loads(irlive("wallet", "--json").stdout)["totals"]
    print(f"wallet after the run: {wallet}; pool purchases in flight at once: {most_at_once}")
    assert most_at_once == 1, f"{most_at_once} pool purchases in flight at once (0: the keeper never bought)"
    assert wallet["bought"] == wallet["spent"] + wallet.get("void", 0) + wallet["pool"]
