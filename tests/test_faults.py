"""Fault injection on the real stack: killed workers, overlapping scans, Redis restarts, seller faults,
connections dropped mid-answer, S3 flapping. After every trial `check_invariants` must find nothing.

Recovery runs on the shipped settings: the broker's visibility timeout, chunk size and call timeout are the
defaults users get (a killed worker's chunks come back through their leases and the watchdog, not through
broker redelivery), and no trial calls `irlive reconcile` for the workers.

CI runs a bounded version (`-m slow`); IRLIVE_LONG_FAULTS=1 runs the long one (>= 100 kills, >= 5 Redis
restarts, overlap trials). Every test prints its seed; IRLIVE_FAULT_SEED=<seed> replays the same fault
schedule (the stack's own timing still varies).
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from sandbox.stack import Stack
from tests.conftest import reset_stack, run_irlive
from tests.e2e import X402_ENV
from tests.faultproxy import FaultProxy
from tests.faults import (
    Books,
    Drive,
    ResumeWatch,
    Supervisor,
    check_invariants,
    drive_to_completion,
    live_samples,
    long_mode,
    scan,
    seed_from_env,
    upload_samples,
)
from worker.seams.store import script_sha

pytestmark = pytest.mark.slow

# Seller-fault trials (not recovery timing) use smaller chunks so a 200-image run spreads over more deliveries.
SMALL_CHUNKS = {"IRLIVE_CHUNK_SIZE": "20"}
# The longest a killed worker's chunk may wait before another delivery takes it up (the promise).
RESUME_WITHIN_S = 60.0


def _report(name: str, seed: int, drive: Drive, books: Books, problems: list[str]) -> str:
    lost = sum(int(m.get("answers_lost") or 0) for m in books.manifests if m)
    line = (f"[{name}] seed={seed} run={drive.run_id} {drive.elapsed_s:.1f}s stalls={drive.stalls} "
            f"verdicts={dict(books.verdicts)} calls_billed={books.ledger.get('calls_billed')} "
            f"images_billed_more_than_once={books.billed_twice} answers_lost={lost} wallet={books.wallet} "
            f"notes={books.notes}")
    print(line)
    for p in problems:
        print(f"[{name}]   VIOLATION: {p}")
    return line


def _workers(stack: Stack, n: int, env: dict[str, str], concurrency: int = 4) -> None:
    for _ in range(n):
        stack.start_worker(extra_env=env, concurrency=concurrency)


# ---- 1. SIGKILL of random workers at random moments -------------------------------------------------


@dataclass
class KillPlan:
    runs: int
    kills_per_run: int
    redis_restarts_per_run: int
    images: int
    workers: int = 3
    concurrency: int = 4
    deadline_s: float = 300.0


def kill_plan() -> KillPlan:
    if long_mode():
        return KillPlan(runs=5, kills_per_run=22, redis_restarts_per_run=1, images=800, deadline_s=900.0)
    return KillPlan(runs=1, kills_per_run=22, redis_restarts_per_run=0, images=800, deadline_s=600.0)


class Killer:
    """Called on every poll of a run: SIGKILLs a random worker at random moments and starts a new one."""

    def __init__(self, stack: Stack, rng: random.Random, plan: KillPlan, env: dict[str, str],
                 watch: ResumeWatch) -> None:
        self.stack, self.rng, self.plan, self.env, self.watch = stack, rng, plan, env, watch
        self.supervisor = Supervisor(stack, env, plan.concurrency)
        self.kills = 0
        self.redis_restarts = 0
        self.next_kill = rng.uniform(0.3, 1.5)
        self.restart_after = sorted(rng.uniform(2.0, 15.0) for _ in range(plan.redis_restarts_per_run))
        self.log: list[str] = []

    def __call__(self, elapsed: float, snap: dict[str, str]) -> None:
        self.watch.poll()
        self.supervisor(elapsed, snap)
        if self.restart_after and elapsed >= self.restart_after[0]:
            self.restart_after.pop(0)
            self.stack.restart_redis(appendonly=True)
            self.redis_restarts += 1
            self.log.append(f"{elapsed:.1f}s redis restart")
        if self.kills >= self.plan.kills_per_run or elapsed < self.next_kill or not self.stack.workers:
            return
        victim = self.rng.choice(self.stack.workers)
        self.watch.before_kill(victim.pid)
        self.stack.kill_worker(victim)
        self.kills += 1
        self.log.append(f"{elapsed:.1f}s kill {victim.name} ({snap.get('done')}/{snap.get('total')})")
        self.stack.start_worker(extra_env=self.env, concurrency=self.plan.concurrency)
        # Random moments: sometimes two kills back to back, sometimes a quiet spell.
        self.next_kill = elapsed + self.rng.choice((0.1, 0.5, 1.0, 2.5)) * self.rng.random() * 2


def _kill_trials(stack: Stack, plan: KillPlan, scans: int, name: str, env: dict[str, str] | None = None) -> None:
    """Runs of `plan.images` images (each scanned `scans` times, a second apart) while workers are SIGKILLed."""
    seed = seed_from_env()
    rng = random.Random(seed)
    env = env or {}  # the shipped settings, or a payment method's
    print(f"seed={seed} plan={plan} scans per trial={scans} env={env}")
    wanted = plan.runs * plan.kills_per_run
    total_kills = total_restarts = trial = 0
    failures: list[str] = []
    watch = ResumeWatch(stack)
    # Runs until both the planned runs and the planned kills are done: a run that ends before its kills
    # hands the rest to one more run, so every kill lands on a live run.
    while (trial < plan.runs or total_kills < wanted) and trial < plan.runs + 3:
        if trial:
            reset_stack(stack)
        # Calls slow enough that kills land mid-call, mid-purchase and between steps alike.
        stack.sandbox_config(latency_ms=rng.choice((200, 300, 500)) * (3 if scans > 1 else 1))
        prefix = f"{name}{trial}"
        samples = live_samples(plan.images, prefix, seed=trial)
        upload_samples(stack, samples)
        # One scan: workers first, so the run is under way from the moment it is queued. Overlapping scans: workers
        # after the scans, so the first run is still being judged while kills land (started before, they judged
        # it during the later scans and no kill met a chunk holder). This order found a worker killed between a
        # paid answer and its record letting another run pay again (seed 975823546; test_claims has that case).
        if scans == 1:
            _workers(stack, plan.workers, env, plan.concurrency)
        budget = plan.kills_per_run if trial < plan.runs else wanted - total_kills
        killer = Killer(stack, rng, dataclasses.replace(plan, kills_per_run=budget), env, watch)
        run_ids = [scan(stack, prefix, env=env) for _ in range(scans)]
        if scans > 1:
            _workers(stack, plan.workers, env, plan.concurrency)
        drives = [drive_to_completion(stack, run_id, deadline_s=plan.deadline_s, during=killer, env=env)
                  for run_id in run_ids]
        watch.poll()
        books = Books()
        problems = check_invariants(stack, run_ids, samples, env=env, books=books)
        unjudged = {v: n for v, n in books.verdicts.items() if v in ("error", "rejected")}
        if unjudged:
            # The seller never fails here: killed workers must cost time and lost answers, not verdicts.
            problems.append(f"images left unjudged by the kills: {unjudged}")
        total_kills += killer.kills
        total_restarts += killer.redis_restarts
        line = _report(f"{name} trial {trial}: {killer.kills} kills, {scans} scans", seed, drives[0], books, problems)
        print("   " + "; ".join(killer.log))
        print(f"   progress (s, images recorded): {drives[0].progress}; workers revived: {killer.supervisor.revived}")
        if scans > 1:
            dups = [int(m.get("duplicates") or 0) for m in books.manifests]
            print(f"   duplicates per run: {dups}")
        if problems:
            failures.append(line + "\n  " + "\n  ".join(problems))
        trial += 1
    print(f"{name}: {total_kills} kills, {total_restarts} redis restarts over {trial} trials, seed {seed}")
    print(f"{name}: resume after a kill: {watch.summary()}")
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)
    assert total_kills >= wanted
    assert total_restarts >= plan.runs * plan.redis_restarts_per_run
    assert watch.resumed_s, "no kill landed on a worker holding a chunk: nothing measured"
    assert not watch.waiting, f"chunks of killed workers never seen resuming: {watch.waiting}"
    assert watch.worst_s <= RESUME_WITHIN_S, watch.summary()


@pytest.mark.timeout(3600)
def test_sigkill_random_workers_at_random_moments(clean_stack: Stack) -> None:
    _kill_trials(clean_stack, kill_plan(), scans=1, name="kill")


@pytest.mark.timeout(3600)
def test_overlapping_scans_while_workers_are_killed(clean_stack: Stack) -> None:
    # Three scans of one prefix a second apart: the nightly still running when the next starts, plus a rescan.
    plan = (KillPlan(runs=3, kills_per_run=10, redis_restarts_per_run=0, images=400, deadline_s=900.0)
            if long_mode() else KillPlan(runs=1, kills_per_run=8, redis_restarts_per_run=0, images=300))
    # At the shipped 2 calls/s (the tests' 50 would judge the 30 calls in a few seconds: a chunk's calls go
    # together, so the kills would meet no chunk holder).
    _kill_trials(clean_stack, plan, scans=3, name="overlap", env={"IRLIVE_RATE_LIMIT_PER_S": "2"})


@pytest.mark.timeout(3600)
def test_sigkill_random_workers_paying_through_the_mcp_tool(clean_stack: Stack) -> None:
    # The same tokens and ledger, the calls sent as MCP tools/call: a kill mid-call leaves the same states.
    plan = (KillPlan(runs=2, kills_per_run=15, redis_restarts_per_run=0, images=600) if long_mode()
            else KillPlan(runs=1, kills_per_run=8, redis_restarts_per_run=0, images=300))
    _kill_trials(clean_stack, plan, scans=1, name="mcp-kill", env={"IRLIVE_PAYMENT_METHOD": "mcp-token"})
    assert clean_stack.sandbox_ledger()["mcp_calls"] > 0


@pytest.mark.timeout(3600)
def test_sigkill_random_workers_paying_by_x402(clean_stack: Stack) -> None:
    # A signature sent by a worker killed before its answer is settled or not by the sandbox on its own; the
    # sweep asks by its payment identifier once it expired, so irlive's ledger equals the settlements.
    plan = (KillPlan(runs=2, kills_per_run=15, redis_restarts_per_run=0, images=600) if long_mode()
            else KillPlan(runs=1, kills_per_run=8, redis_restarts_per_run=0, images=300))
    _kill_trials(clean_stack, plan, scans=1, name="x402-kill", env=dict(X402_ENV))
    ledger = clean_stack.sandbox_ledger()
    assert ledger["x402_settled"] > 0 and ledger["payments_created"] == 0


# ---- 2. Redis stopped and restarted mid-run, with AOF ----------------------------------------------


def test_redis_restart_mid_run_with_aof(clean_stack: Stack) -> None:
    seed = seed_from_env()
    rng = random.Random(seed)
    env = SMALL_CHUNKS
    samples = live_samples(400, "redis", seed=1)
    upload_samples(clean_stack, samples)
    clean_stack.sandbox_config(latency_ms=200)
    _workers(clean_stack, 2, env)
    # At fractions of the work done, not at times: how fast the run goes must not decide whether it happens.
    restarts: list[float] = sorted(rng.uniform(0.1, 0.7) for _ in range(2))
    done_at_restart: list[str] = []

    supervisor = Supervisor(clean_stack, env)

    def restart(elapsed: float, snap: dict[str, str]) -> None:
        supervisor(elapsed, snap)
        done, total = int(snap.get("done") or 0), int(snap.get("total") or 0)
        if restarts and total and done >= restarts[0] * total:
            restarts.pop(0)
            done_at_restart.append(f"{snap.get('done')}/{snap.get('total')}")
            clean_stack.restart_redis(appendonly=True)

    run_id = scan(clean_stack, "redis", env=env)
    drive = drive_to_completion(clean_stack, run_id, deadline_s=240, during=restart, env=env)
    books = Books()
    problems = check_invariants(clean_stack, run_id, samples, env=env, books=books)
    _report(f"redis restarts at {done_at_restart}", seed, drive, books, problems)
    print(f"   progress (s, images recorded): {drive.progress}; workers revived: {supervisor.revived}")
    assert not restarts, "the run finished before every Redis restart happened"
    assert problems == [], f"seed {seed}: {problems}"


# ---- 3. Seller faults: 5xx, latency, timing out after consuming the token ----------------------------


@dataclass(frozen=True)
class SellerFault:
    sandbox: dict[str, Any]
    worker_env: dict[str, str]
    # Only when no answer can be lost after billing does "every image billed exactly once" hold.
    strict_once: bool


# A fifth of settled calls hang past the worker's timeout, and the first one always does: a run meets the
# fault whatever the draws (one seed in CI drew none in ~20 calls: 0.8^20, 1 in 90). The timeout is 2 s, under
# the 3 s hang: at 1 s, calls the seller answered were timed out too on a loaded machine (16 of a run's first 20
# MCP calls once, which failed the run by its failure threshold).
TIMEOUTS = {"p_timeout": 0.2, "timeout_sleep_s": 3.0, "forced_timeouts": 1}
CALL_TIMEOUT = {"IRLIVE_CALL_TIMEOUT_S": "2"}
SELLER_FAULTS = {
    # A 5xx still consumes the token (the seller's default): billed, no verdict, paid again.
    "5xx-30pct": SellerFault({"p_5xx": 0.3}, {}, strict_once=False),
    # The same with refunds: the worker must reconcile the token back to its pool and reuse it.
    "5xx-30pct-refunded": SellerFault({"p_5xx": 0.3, "failed_calls_consume_token": False}, {}, strict_once=True),
    "latency-700ms": SellerFault({"latency_ms": 700}, {}, strict_once=True),
    # The seller consumes the token, then sleeps past the worker's timeout: the answer is lost after billing.
    # "Billed twice" then cannot mean "the seller billed the image twice": the first bill bought nothing the
    # worker could read, so judging the image needs a second paid call. The honest invariant (checked for
    # every trial) is: no image billed twice *with an answer received*, and every bill of every image is a
    # token the worker's ledger holds as spent (answered, or reconciled with GET /api/payments/{id}).
    "timeout-after-consuming": SellerFault(TIMEOUTS, CALL_TIMEOUT, strict_once=False),
    # The same faults with every call sent through the MCP tool.
    "5xx-30pct-mcp": SellerFault({"p_5xx": 0.3}, {"IRLIVE_PAYMENT_METHOD": "mcp-token"}, strict_once=False),
    "timeout-after-consuming-mcp": SellerFault(TIMEOUTS, {**CALL_TIMEOUT, "IRLIVE_PAYMENT_METHOD": "mcp-token"},
                                               strict_once=False),
    # Paid by x402 signatures: a 5xx settles nothing (the reference middleware settles after a 2xx), so every
    # judged image is billed exactly once; a late answer is asked for again under the same payment identifier
    # and comes back settled once, so no answer is lost either.
    "5xx-30pct-x402": SellerFault({"p_5xx": 0.3}, X402_ENV, strict_once=True),
    "timeout-after-settling-x402": SellerFault(TIMEOUTS,
                                               {**CALL_TIMEOUT, **X402_ENV}, strict_once=True),
}


@pytest.mark.parametrize("name", list(SELLER_FAULTS))
def test_seller_faults(clean_stack: Stack, name: str) -> None:
    fault = SELLER_FAULTS[name]
    seed = seed_from_env()
    env = {**SMALL_CHUNKS, **fault.worker_env}
    samples = live_samples(200, name, seed=2)
    upload_samples(clean_stack, samples)
    clean_stack.sandbox_config(seed=seed, **fault.sandbox)
    _workers(clean_stack, 2, env)
    run_id = scan(clean_stack, name, env=env)
    drive = drive_to_completion(clean_stack, run_id, deadline_s=240, env=env)
    books = Books()
    problems = check_invariants(clean_stack, run_id, samples, strict_once=fault.strict_once, env=env, books=books)
    _report(name, seed, drive, books, problems)
    assert problems == [], f"seed {seed}: {problems}"
    if "p_timeout" in fault.sandbox and name.endswith("x402"):
        # Every late answer was fetched again under its identifier: none counted lost.
        assert books.ledger["timeouts"] > 0 and books.wallet.get("answers_lost", 0) == 0, books.wallet
    elif "p_timeout" in fault.sandbox:
        assert books.ledger["timeouts"] > 0 and books.wallet.get("reconciled_spent", 0) > 0, books.wallet
    if "p_5xx" in fault.sandbox:
        assert books.ledger["errors_5xx"] > 0


# ---- 4. Connections dropped between the worker and the seller ----------------------------------------


# Rates high enough that a run's ~45 requests meet at least one fault whatever the seed (at 15 % one seed in
# CI, 1815536289, drew none in 44: 0.85^44 is 1 in 1,300; at 25 %, 1 in 300,000).
PROXY_FAULTS: dict[str, tuple[Callable[[FaultProxy], None], str]] = {
    # Any request (402 quote, purchase, call, payment read-back) may lose its answer after 0..600 bytes.
    "drop-mid-answer": (lambda p: p.drop_mid_answer(after_bytes=(0, 600), p=0.25), "drop"),
    "drop-mid-answer-rst": (lambda p: p.drop_mid_answer(after_bytes=(0, 600), p=0.25, rst=True), "drop"),
    # Refused before a byte reaches the seller: nothing can have been billed.
    "reset-on-connect": (lambda p: p.reset_on_connect(p=0.25), "reset"),
}


@pytest.mark.parametrize(("name", "method"), [*((name, "token") for name in PROXY_FAULTS),
                                              ("drop-mid-answer", "mcp-token")])
def test_connections_to_the_seller_dropped(clean_stack: Stack, name: str, method: str) -> None:
    switch, stat = PROXY_FAULTS[name]
    seed = seed_from_env()
    samples = live_samples(200, name, seed=3)
    upload_samples(clean_stack, samples)
    resumed: list[str] = []

    def person(elapsed: float, snap: dict[str, str]) -> None:
        # Purchases whose answers were cut off are unknown (charged, maybe bought); three in a row pause the
        # run for a person, who looks and resumes it, as the pause reason says.
        if snap.get("state") == "paused" and "no usable token" in snap.get("pause_reason", ""):
            resumed.append(f"{elapsed:.1f}s")
            run_irlive(clean_stack, "resume", run_id, env=env)

    with FaultProxy.for_url(clean_stack.sandbox_url, seed=seed) as proxy:
        env = {**SMALL_CHUNKS, "IRLIVE_MARKETPLACE_URL": proxy.url, "IRLIVE_PAYMENT_METHOD": method}
        switch(proxy)
        _workers(clean_stack, 2, env)
        run_id = scan(clean_stack, name, env=env)
        drive = drive_to_completion(clean_stack, run_id, deadline_s=240, env=env, during=person)
        proxy.pass_through()
        books = Books()
        # Reconciliation asks the seller directly (stack env, no proxy) about every token left open.
        problems = check_invariants(clean_stack, run_id, samples, strict_once=name == "reset-on-connect",
                                    books=books)
        print(f"proxy stats: {dict(proxy.stats)}; resumed after unknown purchases at {resumed}")
    _report(name, seed, drive, books, problems)
    assert problems == [], f"seed {seed}: {problems}"
    assert proxy.stats[stat] > 0


# ---- 5. S3 answering 500/503 for a while ---------------------------------------------------------------


def _the_workers_own(head: bytes) -> bool:
    # The seller downloads whole images through presigned URLs, which point at the proxy too. A seller that
    # cannot download answers InvalidImage.Download, a permanent per-image error by the seller's contract; that
    # is the seller's behaviour, covered elsewhere. Here S3 fails the worker's own calls: its ranged GETs
    # (presigned as well, but always with a Range header), listings, PUTs.
    line, _, headers = head.partition(b"\r\n")
    return b"X-Amz-Signature=" not in line or b"\r\nrange:" in b"\r\n" + headers.lower()


def test_s3_answering_500_and_503_for_a_while(clean_stack: Stack) -> None:
    seed = seed_from_env()
    samples = live_samples(300, "s3flap", seed=4)
    upload_samples(clean_stack, samples)
    clean_stack.sandbox_config(latency_ms=150)
    with FaultProxy.for_url(clean_stack.s3_endpoint, seed=seed) as proxy:
        env = {**SMALL_CHUNKS, "IRLIVE_S3_ENDPOINT_URL": proxy.url}
        _workers(clean_stack, 2, env)
        phases = [(0.3, lambda: proxy.http_error(503, duration_s=3.0, match=_the_workers_own)),
                  (4.5, lambda: proxy.http_error(500, duration_s=2.0, p=0.5, match=_the_workers_own)),
                  # A burst of 40 errors, over within 5 s: as a count alone, a lone last chunk backing off
                  # 4, 8, 16, 32, 60 s between attempts meets it for minutes (CI saw 4 min, seed-dependent).
                  (7.5, lambda: proxy.http_error(500, count=40, duration_s=5.0, match=_the_workers_own))]

        def flap(elapsed: float, snap: dict[str, str]) -> None:
            if phases and elapsed >= phases[0][0]:
                phases.pop(0)[1]()

        # The scan lists through S3 directly: the faults are for the workers.
        run_id = scan(clean_stack, "s3flap", env=SMALL_CHUNKS)
        drive = drive_to_completion(clean_stack, run_id, deadline_s=240, during=flap, env=env)
        proxy.pass_through()
        books = Books()
        problems = check_invariants(clean_stack, run_id, samples, strict_once=True, books=books)
        print(f"proxy stats: {dict(proxy.stats)}")
    _report("s3 500/503", seed, drive, books, problems)
    assert problems == [], f"seed {seed}: {problems}"
    assert proxy.stats["http_error"] > 0


# ---- known worker bugs, reproduced deterministically -------------------------------------------------


def _paid_call_with_token(head: bytes) -> bool:
    return head.startswith(b"POST /api/tools/") and b"\r\nx-payment-token:" in head.lower()


def test_manifest_counts_calls_whose_tokens_were_open_at_finalisation(clean_stack: Stack) -> None:
    samples = live_samples(10, "openfinal")
    upload_samples(clean_stack, samples)
    with FaultProxy.for_url(clean_stack.sandbox_url) as proxy:
        env = {"IRLIVE_MARKETPLACE_URL": proxy.url}
        # The first paid call loses its answer after the seller billed it, and the read-back of that token
        # fails too: the worker pays a second call, and the first token stays 'sent' past finalisation.
        proxy.drop_mid_answer(0, count=2, match=lambda h: _paid_call_with_token(h)
                              or h.startswith(b"GET /api/payments/"))
        _workers(clean_stack, 1, env, concurrency=1)
        run_id = scan(clean_stack, "openfinal", env=env)
        drive_to_completion(clean_stack, run_id, deadline_s=120, env=env)
        problems = check_invariants(clean_stack, run_id, samples)
    print(problems)
    assert proxy.stats["drop"] == 2
    assert problems == []


def test_a_purchase_whose_answer_never_came_back_is_counted_unknown(clean_stack: Stack) -> None:
    samples = live_samples(10, "lostbuy")
    upload_samples(clean_stack, samples)
    with FaultProxy.for_url(clean_stack.sandbox_url) as proxy:
        env = {"IRLIVE_MARKETPLACE_URL": proxy.url}
        proxy.hold_answer(30.0, count=1, match=lambda h: h.startswith(b"POST /api/payments"))
        worker = clean_stack.start_worker(extra_env=env, concurrency=1)
        run_id = scan(clean_stack, "lostbuy", env=env)
        deadline = time.monotonic() + 30
        while clean_stack.sandbox_ledger()["payments_created"] < 1:
            assert time.monotonic() < deadline, "the purchase never reached the seller"
            time.sleep(0.05)
        # The seller has created the payment; its answer is held in the proxy. The worker dies now.
        clean_stack.kill_worker(worker)
        proxy.pass_through()
        _workers(clean_stack, 1, env)
        drive_to_completion(clean_stack, run_id, deadline_s=120, env=env)
        problems = check_invariants(clean_stack, run_id, samples)
    print(problems)
    assert problems == []


@pytest.mark.parametrize("script", ["money/settle", "flow/record"])
def test_an_answer_is_not_lost_to_a_redis_blip_after_paying(clean_stack: Stack, script: str) -> None:
    # The first write of the answer (settle: token spent with its answer) or of its verdicts (record) fails.
    package, name = script.split("/")
    _run_with_redis_cuts(clean_stack, "blip", 10, script_sha(package, name).encode(), 1, {}, concurrency=1)


def _run_with_redis_cuts(stack: Stack, name: str, images: int, pattern: bytes | re.Pattern[bytes], cuts: int,
                         env: dict[str, str], concurrency: int) -> str:
    """One run whose workers reach Redis through a proxy that cuts the first `cuts` commands matching
    `pattern`; asserts the invariants and that many cuts; returns the workers' logs."""
    samples = live_samples(images, name)
    upload_samples(stack, samples)
    redis_port = int(stack.redis_url.rsplit(":", 1)[1].split("/", 1)[0])
    with FaultProxy("127.0.0.1", redis_port) as proxy:
        env = {"IRLIVE_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0", **env}
        _workers(stack, 1, env, concurrency=concurrency)
        proxy.cut_on_send(pattern, count=cuts)
        run_id = scan(stack, name, env=env)
        drive_to_completion(stack, run_id, deadline_s=120, env=env)
        problems = check_invariants(stack, run_id, samples, strict_once=True)
    print(problems)
    assert proxy.stats["cut"] == cuts
    assert problems == []
    return "".join(p.read_text(errors="replace") for p in stack.workdir.glob("w*.log"))


def test_a_delivery_whose_first_redis_write_fails_is_retried_not_acked(clean_stack: Stack) -> None:
    # A chunk task's first write (its delivery count) fails for the first three deliveries. Raising out of the
    # task would let Celery ack the message with the chunk unstarted: the run would stall until the watchdog's
    # search for lost chunks (30 s without progress) sent it again. The task must give its delivery back itself.
    logs = _run_with_redis_cuts(clean_stack, "firstwrite", 30, b":deliveries\r\n", 3,
                                {"IRLIVE_CHUNK_SIZE": "10"}, concurrency=2)
    assert "the broker had lost" not in logs, "a chunk was acked unstarted and found again only by the watchdog"
    assert logs.count("StoreUnavailable") >= 3 and "retrying in" in logs


def test_a_retry_the_broker_would_not_take_leaves_the_delivery_requeued(clean_stack: Stack) -> None:
    # The first delivery's count fails (so the task retries), then every publish of that retry is cut (Celery
    # tries four times, then rejects the delivery without requeueing: acked, chunk unstarted). The task turns
    # that into a requeue of the same delivery.
    logs = _run_with_redis_cuts(clean_stack, "noretry", 10, re.compile(rb':deliveries\r\n|"retries": 1\b'), 5,
                                {}, concurrency=1)
    assert "could not send its retry" in logs
    assert "the broker had lost" not in logs, "the delivery was acked unstarted and found again only by the watchdog"
