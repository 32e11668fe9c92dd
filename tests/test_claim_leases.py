"""Image claims hold while the chunk lease they were taken under does: a heartbeat renews the lease alone (one
round trip, whatever the chunk holds), and a killed worker's claims come free with its lease. Real Redis."""

from __future__ import annotations

import signal
from collections import Counter

import pytest
import redis

from sandbox.procs import wait_until
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET
from tests.faults import live_samples, upload_samples
from worker.errors import RateLimited
from worker.flow.claims import Claims
from worker.flow.leases import CHUNK_LEASE_S, CLAIM_TTL_S, ChunkLease
from worker.flow.limiter import RateLimiter, RateSpec
from worker.keys import Keys
from worker.seams.store import Store

pytestmark = pytest.mark.integration

IMAGES = [f"cams/shot-{i}.png@etag{i}" for i in range(50)]
CONTENTS = [f"md5:{i:032x}:100" for i in range(50)]


def _store(stack: Stack) -> Store:
    return Store(redis.Redis.from_url(stack.redis_url, decode_responses=True))


def _commands(stack: Stack) -> Counter[str]:
    stats = stack.redis_client().info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def test_a_claim_holds_while_its_lease_does_and_comes_free_with_it(clean_stack: Stack) -> None:
    store, keys = _store(clean_stack), Keys()
    claims = Claims(store, keys)
    first = ChunkLease(store, keys, "run-a", 0).__enter__()
    assert claims.claim(first, "run-a", 0, IMAGES, contents=CONTENTS).mine == list(range(50))
    second = ChunkLease(store, keys, "run-b", 0).__enter__()
    try:
        held = claims.claim(second, "run-b", 0, IMAGES, contents=CONTENTS)
        assert held.mine == [] and set(held.busy.values()) == {("run-a", 0)}
        # The first worker is killed: its heartbeat stops and its lease lapses (deleted here, as expiry would).
        # Its claims are still in Redis, for minutes: they hold no longer than the lease did.
        first._stop.set()
        clean_stack.redis_client().delete(keys.chunk_lease("run-a", 0))
        assert clean_stack.redis_client().exists(keys.claim_keys(IMAGES[0], CONTENTS[0])[0])
        assert claims.claim(second, "run-b", 0, IMAGES, contents=CONTENTS).mine == list(range(50))
    finally:
        second.__exit__(None, None, None)


def test_a_heartbeat_renews_the_lease_alone_and_the_claims_still_hold(clean_stack: Stack) -> None:
    store, keys = _store(clean_stack), Keys()
    claims = Claims(store, keys)
    with ChunkLease(store, keys, "run-a", 0, ttl_s=0.3) as lease:  # a beat every 0.1 s
        claims.claim(lease, "run-a", 0, IMAGES, contents=CONTENTS)
        before = _commands(clean_stack)
        client = clean_stack.redis_client()
        wait_until(lambda: (_commands(clean_stack) - before)["evalsha"] >= 10, 10, "ten heartbeats", interval=0.05)
        used = _commands(clean_stack) - before
        # One script a beat: GET and PEXPIRE of the lease; the 100 claims under it are not read each time.
        assert used["get"] <= used["evalsha"] + 1 and used["pexpire"] <= used["evalsha"] + 1, used
        # Ten beats (a second: three lease lifetimes) later every claim still holds against another run.
        other = ChunkLease(store, keys, "run-b", 0).__enter__()
        try:
            assert claims.claim(other, "run-b", 0, IMAGES, contents=CONTENTS).mine == []
        finally:
            other.__exit__(None, None, None)
        assert 0 < client.pttl(keys.claim_keys(IMAGES[0], CONTENTS[0])[0]) <= CLAIM_TTL_S * 1000


def test_a_calls_in_flight_slot_beats_with_its_chunk_lease_and_lapses_with_it(clean_stack: Stack) -> None:
    store, keys = _store(clean_stack), Keys()
    limiter = RateLimiter(store, keys, RateSpec(1000, max_in_flight=1))
    lease = ChunkLease(store, keys, "run-a", 0, ttl_s=0.3).__enter__()  # a beat every 0.1 s
    permit = limiter.admit(lease_s=lease.ttl_s)
    lease.hold_slot(permit.member)
    before = _commands(clean_stack)
    wait_until(lambda: (_commands(clean_stack) - before)["evalsha"] >= 10, 10, "ten heartbeats", interval=0.05)
    # Three lease lifetimes later the call still holds the fleet's only slot.
    assert limiter.stats()["in_flight"] == 1
    with pytest.raises(RateLimited):
        limiter.admit(max_wait_s=0.05)
    # The worker is killed: its heartbeat stops. The slot lapses with the lease, not a call timeout later.
    lease._stop.set()
    lease._thread.join(5)
    client = clean_stack.redis_client()
    seconds, micros = client.time()
    expiry = client.zscore(keys.ratelimit_slots(), permit.member)
    assert expiry is not None and expiry - (seconds * 1000 + micros // 1000) <= lease.ttl_s * 1000
    limiter.admit(max_wait_s=5).release()


def test_a_worker_killed_mid_call_frees_its_in_flight_slot_with_its_chunk_lease(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    """Through a real worker: a SIGKILLed call's slot held the shipped cap for the call timeout + 30 s (60 s);
    kills landing every few seconds filled the cap with dead slots and stalled the fleet (CI's kill trial)."""
    upload_samples(clean_stack, live_samples(10, "slot"))
    clean_stack.sandbox_config(latency_ms=20_000)  # the call is on the wire when the worker dies
    worker = clean_stack.start_worker(concurrency=1)
    irlive("scan", f"s3://{IN_BUCKET}/slot", "--json")
    client = clean_stack.redis_client()
    slots = Keys().ratelimit_slots()
    wait_until(lambda: client.zcard(slots) >= 1, 60, "a call in flight")
    clean_stack.kill_worker(worker, signal.SIGKILL)
    seconds, micros = client.time()
    [(_, expiry)] = client.zrange(slots, 0, -1, withscores=True)
    assert expiry - (seconds * 1000 + micros // 1000) <= CHUNK_LEASE_S * 1000
