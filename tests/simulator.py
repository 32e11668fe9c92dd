"""A deterministic fault simulator of the money core, as FoundationDB and TigerBeetle test theirs.

One seed drives the real pipeline, ledger, purchaser and Lua scripts (on a private redis-server without
persistence, flushed between seeds: fakeredis runs the scripts ~50x slower) against a seller model and an S3
model, with a fault possible at every boundary:

- purchases: refused before sending, a timeout after the seller charged, a 2xx with an empty, renamed or
  too deeply nested body, a 5xx after charging, a price rise;
- paid calls: refused before sending, a timeout before or after the seller took the token, a 5xx after it
  took it, a 429 with any Retry-After, a 2xx that cannot be read, an answer missing an image;
- the store: a script refused before it applies (READONLY, OOM) or after (a dropped connection, a short
  WAIT: applied, then reported failed);
- S3: one object's read failing for a while;
- the worker killed before or after any script of a delivery: its leases lapse (time passes), the sweep runs,
  another delivery takes the chunk over. Two runs over the same images (an overlapping scan) interleave
  their deliveries.

After every seed it checks, with unknown purchases counted: each run's commitment within its cap and the
day's within the daily cap (a price rise may cross one by the rise, as the purchase that met it is charged at
what was paid); the seller's charges equal the ledger's bought and unknown purchases; no image recorded twice
and every image of every run with exactly one record; no image's usable answer delivered twice except for
answers the ledger counts as lost; nothing left reserved or sent. A violation names the seed:
`IRLIVE_SIM_SEED=<seed> .venv/bin/pytest tests/test_simulator.py -k replay` replays it.

Time is the simulator's: the pipeline's clock and sleeps advance a counter, and the store's retry pauses are
skipped; a sleep never happens. What runs on the Redis server's clock (leases, the limiter's cool-down) is
moved on by deleting what would have lapsed, so a replay follows the same fault schedule, though a branch
that reads the Redis clock may go another way. Worker concurrency is not modelled (deliveries run one after another):
the real-process fault suite (tests/test_faults.py) covers races between threads and processes.

Long mode, by hand: `.venv/bin/python -m tests.simulator --seeds 100000 --jobs 2` (figures in docs/FAULTS.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from unittest import mock
from urllib.parse import unquote, urlsplit

import httpx
import redis

from sandbox import procs
from sandbox.images import png
from tests.stubs import SERVICE, StubStorage
from worker.config import Settings
from worker.errors import (
    BudgetExhausted,
    ConfigError,
    IrliveError,
    RunHeld,
    StoreRefused,
    StoreUnavailable,
    TransientError,
)
from worker.flow import pipeline
from worker.flow.claims import Claims
from worker.flow.inline import InlineExecutor
from worker.flow.limiter import RateLimiter, RateSpec
from worker.flow.pipeline import ChunkProcessor, Deps
from worker.flow.runs import Runs
from worker.judge.manifest import split_identities
from worker.keys import Keys
from worker.messages import Chunk
from worker.money.budgets import Budgets, today
from worker.money.ledger import Ledger
from worker.money.methods import TokenOverHttp
from worker.seams import store as store_module
from worker.seams.marketplace import Marketplace
from worker.seams.storage import ObjectInfo, Storage
from worker.seams.store import Script, Store

BUCKET = "in-bucket"
OUTPUT = "s3://out-bucket/results"
# Steps (deliveries and sweeps) after which a seed that has not finished is a violation: a stuck run.
MAX_STEPS = 400
# Scripts a worker may die just before or just after.
CRASH_SCRIPTS = ("money/take", "money/send", "money/settle", "money/buy_begin", "money/buy_end", "money/buy_failed",
                 "money/call_end", "money/give_back", "flow/claim", "flow/record", "flow/lease_take",
                 "flow/complete_chunk",
                 # Twice as likely: where a paid call or purchase is between leaving and being written down.
                 "money/send", "money/settle", "money/buy_begin", "flow/record")


class Crash(BaseException):
    """The worker process dies here: nothing after this line of it runs (not even its `finally` clauses'
    Redis writes, which fail the same way)."""


@dataclass
class Faults:
    """Per-seed probabilities of each fault at its boundary (most seeds turn on a few, at various rates)."""

    buy_refused: float = 0.0
    buy_timeout: float = 0.0
    buy_unreadable: float = 0.0
    buy_5xx: float = 0.0
    price_rise: float = 0.0
    call_refused: float = 0.0
    call_timeout_before: float = 0.0
    call_timeout_after: float = 0.0
    call_5xx: float = 0.0
    call_429: float = 0.0
    call_garbage: float = 0.0
    call_missing: float = 0.0
    lookup_fails: float = 0.0
    store_before: float = 0.0
    store_after: float = 0.0
    crash: float = 0.0
    s3_read: float = 0.0

    @classmethod
    def draw(cls, rng: random.Random) -> Faults:
        faults = cls()
        for name in vars(faults):
            if rng.random() < 0.35:
                setattr(faults, name, rng.choice((0.02, 0.05, 0.1, 0.25)))
        # Per script, a store fault is rarer (a chunk runs some fifty); `crash` is per delivery.
        faults.store_before = min(faults.store_before, 0.03)
        faults.store_after = min(faults.store_after, 0.03)
        # Deaths matter most, with the other faults or alone: 3 seeds in 5 kill workers, one delivery in 5 to 2.
        faults.crash = rng.choice((0.2, 0.35, 0.5)) if rng.random() < 0.6 else 0.0
        return faults

    def injected(self) -> list[str]:
        return [name for name, p in vars(self).items() if p]


class SimTime:
    """The pipeline's clock: `time.monotonic()` and sleeps advance a counter, never the wall clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def time(self) -> float:
        return self.now


@dataclass
class SimSeller:
    """The marketplace: tokens settled before the upstream runs, and a fault drawn at each boundary."""

    rng: random.Random
    faults: Faults
    price_cents: int = 20
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    charged: int = 0
    charged_cents: int = 0
    prices: set[int] = field(default_factory=lambda: {20})
    billed: Counter[str] = field(default_factory=Counter)
    # Usable elements per image that reached the client: two for one image is a double payment.
    delivered: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    def _p(self, name: str) -> bool:
        return self.rng.random() < float(getattr(self.faults, name))

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/payments" and request.method == "POST":
            return self._buy(request)
        if path.startswith("/api/payments/"):
            if self._p("lookup_fails"):
                return httpx.Response(503, json={"error": "try later"})
            doc = dict(self.payments[path.rsplit("/", 1)[1]])
            doc.pop("token")
            return httpx.Response(200, json=doc)
        return self._call(request)

    def _buy(self, request: httpx.Request) -> httpx.Response:
        if self._p("buy_refused"):
            raise httpx.ConnectError("connection refused", request=request)
        if self._p("price_rise"):
            self.price_cents += self.rng.choice((5, 10))
            self.prices.add(self.price_cents)
        pid = f"pay_{len(self.payments) + 1}"
        self.payments[pid] = {"paymentId": pid, "token": f"tok-{pid}", "amountCents": self.price_cents,
                              "status": "paid", "remainingCalls": 1, "currency": "USD"}
        self.charged += 1
        self.charged_cents += self.price_cents
        if self._p("buy_timeout"):
            raise httpx.ReadTimeout("the purchase's answer never came", request=request)
        if self._p("buy_5xx"):
            return httpx.Response(500, json={"error": "internal"})
        if self._p("buy_unreadable"):
            return self.rng.choice((
                httpx.Response(201, content=b""),
                httpx.Response(201, json={**{k: v for k, v in self.payments[pid].items() if k != "token"},
                                          "tkn": f"tok-{pid}"}),
                httpx.Response(201, content=b"[" * 50_000 + b"]" * 50_000),
            ))
        return httpx.Response(201, json=self.payments[pid])

    def _call(self, request: httpx.Request) -> httpx.Response:
        token = request.headers.get("X-Payment-Token")
        if not token:
            return httpx.Response(402, json={"x402Version": 1, "serviceId": SERVICE, "priceCents": self.price_cents,
                                             "currency": "USD"})
        if self._p("call_refused"):
            raise httpx.ConnectError("connection refused", request=request)
        if self._p("call_429"):
            retry_after = self.rng.choice(("0", "0.01", "1", "30", "1e400", "soon", "-5"))
            return httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": retry_after})
        if self._p("call_timeout_before"):
            raise httpx.ReadTimeout("no answer; the token was not taken", request=request)
        payment = next((p for p in self.payments.values() if p["token"] == token), None)
        if payment is None or not payment["remainingCalls"]:
            return httpx.Response(402, json={"error": "payment token already used"})
        urls = [t["ImageURL"] for t in json.loads(request.content)["Tasks"]]
        keys = [unquote(urlsplit(u).path).split("/", 2)[2] for u in urls]
        payment["remainingCalls"] = 0
        self.calls += 1
        self.billed.update(keys)
        if self._p("call_timeout_after"):
            raise httpx.ReadTimeout("the answer never came", request=request)
        if self._p("call_5xx"):
            return httpx.Response(503, json={"Code": "ServiceUnavailable", "Message": "try later"})
        if self._p("call_garbage"):
            return httpx.Response(200, content=b"<html>oops</html>")
        elements = [{"FaceNumber": 1, "ImageURL": u, "Results": [
            {"Label": "normal", "Rate": 99.5, "Suggestion": "pass", "MessageTips": "",
             "Rect": {"Left": 1, "Top": 2, "Width": 3, "Height": 4}}]} for u in urls]
        answered = keys
        if len(elements) > 1 and self._p("call_missing"):
            elements, answered = elements[:-1], keys[:-1]
        self.delivered.update(answered)
        body = {"code": "200", "message": "success", "requestId": f"req-{self.calls}", "content": "",
                "data": {"Action": "DetectInfraredLivingFace",
                         "Result": {"RequestId": "up", "Data": {"Elements": elements}}}}
        return httpx.Response(200, json=body)


class SimStorage(StubStorage):
    """S3 in memory whose reads of an object fail for a while, at the seed's rate."""

    def __init__(self, rng: random.Random, faults: Faults) -> None:
        super().__init__()
        self._rng = rng
        self._faults = faults

    def read_head(self, bucket: str, key: str, max_bytes: int) -> tuple[ObjectInfo, bytes]:
        if self._rng.random() < self._faults.s3_read:
            raise TransientError(f"s3://{bucket}/{key}: 503 SlowDown")
        return super().read_head(bucket, key, max_bytes)


class _FaultyScript:
    """A script that may be refused before it applies, or applied and then reported failed, or kill the worker."""

    def __init__(self, inner: Script, store: SimStore) -> None:
        self._inner = inner
        self._store = store

    def __call__(self, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        sim = self._store
        sim.tick(self._inner.name, "before")
        if sim.roll("store_before"):
            raise (StoreRefused("Redis: OOM") if sim.rng.random() < 0.3 else StoreUnavailable("Redis: READONLY"))
        result = self._inner(keys, args)
        sim.tick(self._inner.name, "after")
        if sim.roll("store_after"):
            raise StoreUnavailable("Redis: the connection dropped after the script ran (or a short WAIT)")
        return result


class SimStore(Store):
    """One worker process's view of the store: its scripts go through the fault layer; once it is dead,
    every one of them raises Crash."""

    def __init__(self, client: redis.Redis, rng: random.Random, faults: Faults, *, faulty: bool) -> None:
        super().__init__(client)
        self.rng = rng
        self.faults = faults
        self.faulty = faulty
        self.dead = False
        # Where this worker dies, if it does: before or after the n-th run of one script (the money scripts and
        # the records are where a death costs something), or at the n-th script boundary of any.
        self._crash_at: tuple[str, str, int] | None = None
        if faulty and rng.random() < faults.crash:
            self._crash_at = (rng.choice(CRASH_SCRIPTS), rng.choice(("before", "after")), rng.choice((1, 1, 2)))
        self._seen: Counter[tuple[str, str]] = Counter()

    def roll(self, name: str) -> bool:
        return self.faulty and self.rng.random() < float(getattr(self.faults, name))

    def tick(self, script: str, when: str) -> None:
        """One script boundary: a dead worker runs nothing more; the one fated to die here dies."""
        if self.dead:
            raise Crash()
        self._seen[(script, when)] += 1
        target = self._crash_at
        if target is not None and target[:2] == (script, when) and self._seen[(script, when)] == target[2]:
            self.dead = True
            raise Crash()

    def script(self, package: str, name: str) -> Script:
        # One Script per text and client across the seed's many worker views (reading the files is not free);
        # keyed by the source reader too, so a test that changes a script's text gets its own.
        key = (id(self.client), package, name, store_module.script_source)
        if key not in _SCRIPTS:
            _SCRIPTS[key] = Script(self.client, f"{package}/{name}", store_module.script_source(package, name),
                                   self.replication)
        return cast(Script, _FaultyScript(_SCRIPTS[key], self))


# Keyed by the reader itself, not its id: a reader a test dropped could leave its id to another.
_SCRIPTS: dict[tuple[int, str, str, Callable[[str, str], str]], Script] = {}


@dataclass
class Report:
    seed: int
    faults: list[str]
    images: int
    runs: int
    steps: int = 0
    crashes: int = 0
    deliveries: int = 0
    calls: int = 0
    charged: int = 0
    unknown_purchases: int = 0
    answers_lost: int = 0
    violations: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"seed={self.seed} images={self.images} runs={self.runs} steps={self.steps} "
                f"deliveries={self.deliveries} crashes={self.crashes} calls={self.calls} charged={self.charged} "
                f"unknown_purchases={self.unknown_purchases} answers_lost={self.answers_lost} "
                f"faults={','.join(self.faults) or 'none'}")


@contextmanager
def _sim_clock(clock: SimTime) -> Iterator[None]:
    # The pipeline's clock, and the store's pause between retries of a write that must not be lost.
    with mock.patch.object(pipeline, "time", clock), mock.patch.object(time, "sleep", clock.sleep):
        yield


class World:
    """Everything one seed runs against; deliveries build their own worker (Deps) over the shared parts."""

    def __init__(self, seed: int, client: redis.Redis) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = Faults.draw(self.rng)
        client.flushall()
        self.client = client
        self.keys = Keys()
        self.seller = SimSeller(random.Random(self.rng.random()), self.faults)
        self.storage = SimStorage(random.Random(self.rng.random()), self.faults)
        self.clock = SimTime()
        daily = self.rng.choice((None, None, 1.0, 3.0))
        self.settings = Settings(output=None, rate_limit_per_s=1000.0, max_in_flight=0,
                                 token_pool_size=self.rng.choice((0, 0, 2)), token_pool_low=1,
                                 max_attempts=self.rng.randint(2, 5), daily_budget_usd=daily,
                                 max_price_cents=self.rng.choice((20, 25, 30)),
                                 chunk_size=self.rng.choice((5, 10, 20)))
        self.images = self.rng.randint(1, 30)
        self.items = []
        for i in range(self.images):
            key = f"cam/{i:03d}.png"
            self.items.append((key, self.storage.put(BUCKET, key, png(64, 64, "live", seed=i))))
        self.report = Report(seed, self.faults.injected(), self.images, runs=self.rng.choice((1, 2, 2)))
        self.budgets: dict[str, int | None] = {}

    def deps(self, *, faulty: bool = True) -> Deps:
        store = SimStore(self.client, random.Random(self.rng.random()), self.faults, faulty=faulty)
        market = Marketplace("http://seller.sim", SERVICE, transport=httpx.MockTransport(self.seller.handle),
                             timeout_s=5)
        ledger = Ledger(store, self.keys, market, Budgets(store, self.keys, self.settings.daily_budget_cents),
                        max_price_cents=self.settings.max_price_cents, lease_s=60,
                        max_unknown_purchases=self.settings.max_unknown_purchases)
        ledger._rng = random.Random(self.rng.random())  # which pooled token is taken: the seed's choice too
        return Deps(settings=self.settings, store=store, storage=cast(Storage, self.storage), market=market,
                    method=TokenOverHttp(market), ledger=ledger,
                    # Not adaptive: a throttle's cool-down runs on the Redis clock, which the simulated time does
                    # not move (a caller in line would spin through a 30 s Retry-After in real time).
                    limiter=RateLimiter(store, self.keys, RateSpec(1000.0, max_in_flight=0, adaptive=False),
                                        sleep=self.clock.sleep),
                    runs=Runs(store, self.keys), claims=Claims(store, self.keys), sleep=self.clock.sleep,
                    rng=random.Random(self.rng.random()), reads=InlineExecutor())

    def create_runs(self) -> list[Chunk]:
        runs = Runs(Store(self.client), self.keys)
        chunks: list[Chunk] = []
        size = self.settings.chunk_size
        for r in range(self.report.runs):
            run_id = f"run-{r}"
            budget = self.rng.choice((None, 60, 100, 200))
            self.budgets[run_id] = budget
            runs.create(run_id, source=f"s3://{BUCKET}/cam", output=OUTPUT, settings={}, budget_cents=budget)
            for start in range(0, len(self.items), size):
                seq = runs.add_chunk(run_id, self.items[start:start + size])
                chunks.append(Chunk(run_id, seq, BUCKET, self.items[start:start + size]))
            runs.listing_finished(run_id)
        return chunks

    def after_crash(self) -> None:
        """Time passes: leases and the claims taken under them lapse (pinned claims do not); the sweep settles
        what the dead worker left open, as the watchdog's would."""
        names = self.client.keys("*")
        pipe = self.client.pipeline(transaction=False)
        for key in names:
            pipe.pttl(key)
        lapsed = [key for key, ttl in zip(names, pipe.execute(), strict=True) if 0 < ttl <= 20_000]
        if lapsed:
            self.client.delete(*lapsed)
        # The limiter's cool-down after a throttle runs on the Redis clock, which the simulator does not move:
        # it is over by now.
        self.client.delete(self.keys.ratelimit(), self.keys.ratelimit_state())
        self._sweep()

    def _sweep(self) -> None:
        deps = self.deps(faulty=False)
        # A seller that cannot be asked now (a failing lookup) is asked again by the next sweep.
        with suppress(IrliveError):
            deps.ledger.sweep(everything=True)

    def person(self, run_id: str) -> None:
        """Someone resumes a paused run, raising its budget if the budget is what held it."""
        runs = Runs(Store(self.client), self.keys)
        run = runs.get(run_id)
        if run is None or run["state"] not in ("paused", "paused_budget"):
            return
        budget = None
        if run["state"] == "paused_budget":
            budget = int(run.get("committed_cents") or 0) + 200
            self.budgets[run_id] = budget
        try:
            runs.resume(run_id, budget)
        except ConfigError:
            budget = int(run.get("committed_cents") or 0) + 400
            self.budgets[run_id] = budget
            runs.resume(run_id, budget)

    def day_cap_reached(self) -> bool:
        cap = self.settings.daily_budget_cents
        bought = int(self.client.hget(self.keys.day(today()), "bought_cents") or 0)
        return cap is not None and bought + max(self.seller.prices) > cap


def run_seed(seed: int, client: redis.Redis) -> Report:
    """One seed, start to finish, on `client` (a private Redis this process may flush)."""
    world = World(seed, client)
    clock = world.clock
    with _sim_clock(clock):
        pending = world.create_runs()
        report = world.report
        runs = Runs(Store(world.client), world.keys)
        killed: Chunk | None = None
        while pending and report.steps < MAX_STEPS:
            report.steps += 1
            # A killed worker's chunk comes back only once its lease lapses and the watchdog sees it: other
            # deliveries (another run's, over the same images) mostly go first.
            others = [c for c in pending if c != killed]
            chunk = world.rng.choice(others if others and world.rng.random() < 0.8 else pending)
            killed = None
            if world.settings.token_pool_size and world.rng.random() < 0.2:
                _refill(world)
            deps = world.deps()
            report.deliveries += 1
            try:
                ChunkProcessor(deps).run(chunk)
            except Crash:
                report.crashes += 1
                killed = chunk
                world.after_crash()
            except (RunHeld, BudgetExhausted) as exc:
                if isinstance(exc, BudgetExhausted):
                    runs.pause(chunk.run_id, str(exc))
                if world.day_cap_reached():
                    # The day's cap holds every run: the person cancels them, and the rest ends `not_judged`.
                    for run_id in {c.run_id for c in pending}:
                        runs.fail(run_id, "the daily budget is spent")
                else:
                    world.person(chunk.run_id)
            except ConfigError as exc:
                runs.fail(chunk.run_id, str(exc))
            except IrliveError:
                pass  # retried later (a deferral, a transient failure, the chunk's own backoff)
            if world.rng.random() < 0.3:
                clock.sleep(20)
                world.after_crash()  # time passes, whether or not someone died
            pending = [c for c in pending if not runs.chunk_complete(c.run_id, c.seq)]
        if pending:
            report.violations.append(f"{len(pending)} chunks never completed in {MAX_STEPS} steps: "
                                     f"{sorted({c.label() for c in pending})[:4]}")
        world.faults = Faults()  # the books are closed with a seller and store that answer
        world.seller.faults = world.faults
        world._sweep()
        check(world)
    return report


def _refill(world: World) -> None:
    deps = world.deps()
    try:
        deps.ledger.refill(world.settings.token_pool_size)
    except Crash:
        world.report.crashes += 1
        world.after_crash()
    except IrliveError:
        pass


def check(world: World) -> None:
    """The invariants of the money core, after a seed."""
    report, client, keys, seller = world.report, world.client, world.keys, world.seller
    v = report.violations
    slack = max(seller.prices) - min(seller.prices)
    totals = {k: int(x) for k, x in client.hgetall(keys.wallet_totals()).items()}
    report.calls, report.charged = seller.calls, seller.charged
    report.unknown_purchases = totals.get("unknown_purchases", 0)
    report.answers_lost = totals.get("answers_lost", 0)
    # Every charge of the seller is in the ledger, bought or unknown (an unknown one may never have reached the
    # seller: a worker that died between writing it down and sending it), and nothing is bought it did not sell.
    bought, unknown = totals.get("bought", 0), totals.get("unknown_purchases", 0)
    if not bought <= seller.charged <= bought + unknown:
        v.append(f"seller charged {seller.charged} purchases; ledger: {bought} bought + {unknown} unknown")
    # An unknown purchase the seller never saw costs budget for nothing: only a worker dying between writing
    # it down and sending it may leave one (a store that failed to confirm the write must settle it failed) -
    # as many as it had open: a chunk's calls go together, and at most IRLIVE_MAX_UNKNOWN_PURCHASES requests are
    # open at once (buy_begin.lua).
    phantoms = bought + unknown - seller.charged
    if phantoms > report.crashes * world.settings.max_unknown_purchases:
        v.append(f"{phantoms} purchases written down as unknown never reached the seller; {report.crashes} "
                 f"workers died, each with at most {world.settings.max_unknown_purchases} open")
    if not world.settings.token_pool_size and all(b is not None for b in world.budgets.values()):
        # Every purchase is some run's: the seller was paid at most what the runs were allowed.
        allowed = sum(b or 0 for b in world.budgets.values())
        if seller.charged_cents > allowed + slack * max(1, seller.charged):
            v.append(f"the seller was paid {seller.charged_cents}c; the runs were allowed {allowed}c")
    cap = world.settings.daily_budget_cents
    day = int(client.hget(keys.day(today()), "bought_cents") or 0)
    if cap is not None and day > cap + slack:
        v.append(f"day charged {day}c against a cap of {cap}c")
    if len(seller.prices) == 1 and day < seller.charged_cents:
        # (After a price rise, an unknown purchase is charged at the quote: the seller's price is not known.)
        v.append(f"day charged {day}c; the seller charged {seller.charged_cents}c")
    lost_images: Counter[str] = Counter()
    for key in cast(list[str], client.keys(keys.payment("*"))):
        pay = cast(dict[str, str], client.hgetall(key))
        if pay.get("state") in ("reserved", "sent"):
            v.append(f"{key} left {pay['state']}")
        if pay.get("lost") == "1":
            carried = split_identities(str(pay.get("images") or ""))
            lost_images.update(i.rsplit("@", 1)[0].split("/", 1)[1] for i in carried if i)
    for key, n in seller.delivered.items():
        if n > 1 + lost_images[key]:
            v.append(f"{key}: {n} usable answers delivered, {lost_images[key]} counted lost")
    for run_id, budget in world.budgets.items():
        run = client.hgetall(keys.run(run_id))
        committed = int(run.get("committed_cents") or 0)
        if budget is not None and committed > budget + slack:
            v.append(f"{run_id}: committed {committed}c against a budget of {budget}c")
        records: Counter[str] = Counter()
        for seq in range(int(run.get("chunks") or 0)):
            progress = client.hgetall(keys.chunk_progress(run_id, seq))
            records.update(json.loads(r)["key"] for r in progress.values())
        missing = [k for k, _ in world.items if records[k] == 0]
        twice = [k for k, n in records.items() if n > 1]
        if twice:
            v.append(f"{run_id}: recorded twice: {twice[:3]}")
        if missing:
            v.append(f"{run_id}: {len(missing)} images without a record")



@contextmanager
def private_redis(workdir: Path) -> Iterator[redis.Redis]:
    """A redis-server of its own on a Unix socket (a third faster than TCP here), keeping nothing on disk (the
    simulator flushes it per seed)."""
    sock = workdir / "redis.sock"
    proc = procs.spawn([procs.find_redis_server(), "--port", "0", "--unixsocket", str(sock), "--save", "",
                        "--appendonly", "no", "--dir", str(workdir)], workdir / "redis.log")
    try:
        client = redis.Redis(unix_socket_path=str(sock), decode_responses=True)

        def pings() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        procs.wait_until(pings, 30, "simulator redis", log=workdir / "redis.log", proc=proc)
        yield client
        client.close()
    finally:
        procs.kill_group(proc)


def _run_range(first: int, count: int) -> list[Report]:
    # Quiet in the pool's processes only: `main` also runs inside pytest, whose other tests read logs.
    logging.disable(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp, private_redis(Path(tmp)) as client:
        return [run_seed(seed, client) for seed in range(first, first + count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.simulator", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1000, help="how many seeds (default 1000)")
    parser.add_argument("--first", type=int, default=0, help="the first seed (default 0)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
    ns = parser.parse_args(argv)
    started = time.monotonic()
    batch = 500
    ranges = [(s, min(batch, ns.first + ns.seeds - s)) for s in range(ns.first, ns.first + ns.seeds, batch)]
    totals: Counter[str] = Counter()
    bad: list[Report] = []
    # Spawned, not forked: `main` also runs inside pytest, and a child forked from a process with threads (xdist's
    # channel, logging) can hang at exit on a lock one of them held; the executor then waits for it for ever.
    with ProcessPoolExecutor(max_workers=ns.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for reports in pool.map(_run_range, *zip(*ranges, strict=True)):
            for r in reports:
                totals.update({"seeds": 1, "deliveries": r.deliveries, "crashes": r.crashes, "calls": r.calls,
                               "charged": r.charged, "unknown_purchases": r.unknown_purchases,
                               "answers_lost": r.answers_lost, "faults": len(r.faults)})
                if r.violations:
                    bad.append(r)
                    print(f"VIOLATION {r.line()}: {r.violations}", flush=True)
            print(f"... {totals['seeds']} seeds, {len(bad)} with violations, "
                  f"{time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    print(f"{totals['seeds']} seeds in {time.monotonic() - started:.0f}s on {ns.jobs} processes: "
          f"{totals['faults']} fault kinds switched on, {totals['crashes']} workers killed, "
          f"{totals['deliveries']} deliveries, {totals['calls']} paid calls, {totals['charged']} purchases charged, "
          f"{totals['unknown_purchases']} unknown purchases, {totals['answers_lost']} answers lost; "
          f"{len(bad)} seeds with violations")
    for r in bad[:10]:
        print(f"replay: IRLIVE_SIM_SEED={r.seed} .venv/bin/pytest tests/test_simulator.py -k replay -s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
