"""Thin Celery tasks: decode the message, build dependencies once per process, run the pipeline, map errors."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Celery, Task

from worker.config import Settings
from worker.errors import (
    BudgetExhausted,
    ChunkBusy,
    ConfigError,
    IrliveError,
    PermanentInputError,
    RateLimited,
    TransientError,
)
from worker.flow.finalize import finalize_run
from worker.flow.limiter import RateLimiter, RateSpec
from worker.flow.pipeline import Chunk, ChunkProcessor, Deps
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.money.budgets import Budget
from worker.money.ledger import Wallet
from worker.money.pool import PoolKeeper
from worker.ops.recovery import Recovery
from worker.ops.redact import redact
from worker.ops.watchdog import Watchdog
from worker.seams.marketplace import Marketplace
from worker.seams.storage import Storage

PROCESS_CHUNK = "irlive.process_chunk"
FINALIZE_RUN = "irlive.finalize_run"
log = logging.getLogger("irlive.tasks")


def build_deps(settings: Settings) -> Deps:
    """Every long-lived client one worker process needs."""
    keys = Keys(settings.key_prefix)
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True, health_check_interval=30)
    market = Marketplace(settings.marketplace_url, settings.service_id, api_key=settings.api_key,
                         api_key_header=settings.api_key_header, timeout_s=settings.call_timeout_s)
    budget = Budget(client, keys, settings.daily_budget_cents)
    wallet = Wallet(client, market, keys, budget, max_price_cents=settings.max_price_cents,
                    lease_s=2 * settings.call_timeout_s + 30)
    return Deps(
        settings=settings,
        storage=Storage(settings.s3_endpoint_url, settings.s3_region, max_connections=64),
        market=market,
        wallet=wallet,
        limiter=RateLimiter(client, keys.ratelimit(), RateSpec(
            settings.rate_limit_per_s, settings.rate_burst, max_in_flight=settings.max_in_flight,
            adaptive=settings.rate_adaptive)),
        runs=Runs(client, keys),
    )


class _LazyDeps:
    """Builds Deps (and starts the background threads) on first use in each process: never at import or per task."""

    def __init__(self, settings: Settings, app: Celery) -> None:
        self._settings = settings
        self._app = app
        self._deps: Deps | None = None
        self._lock = threading.Lock()

    def get(self) -> Deps:
        with self._lock:
            if self._deps is None:
                deps = build_deps(self._settings)
                deps.wallet.sweep()
                keys = Keys(self._settings.key_prefix)
                if self._settings.token_pool_size > 0:
                    PoolKeeper(deps.wallet, deps.runs.redis, keys,
                               size=self._settings.token_pool_size, low=self._settings.token_pool_low).start()
                Watchdog(deps.runs, Recovery(deps.runs.redis, keys, deps.runs), keys,
                         lambda name, args: self._app.send_task(name, args=args),
                         stall_s=self._settings.visibility_timeout + 60, wallet=deps.wallet).start()
                self._deps = deps
            return self._deps


def register_tasks(app: Celery, settings: Settings) -> None:
    lazy = _LazyDeps(settings, app)
    # Countdowns keep the message unacked on the worker, so they must stay well under the visibility timeout.
    max_countdown = max(1.0, settings.visibility_timeout / 4)

    @app.task(name=PROCESS_CHUNK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def process_chunk(self: Task, message: dict[str, Any]) -> None:
        deps = lazy.get()
        try:
            chunk = Chunk.from_message(message)
        except PermanentInputError as exc:
            log.error("dropping message: %s", exc)
            return
        processor = ChunkProcessor(deps)
        # Counted before the work, so a chunk that kills its worker every time is still caught.
        deliveries = deps.runs.count_delivery(chunk.run_id, chunk.seq)
        if deliveries > settings.max_deliveries:
            reason = deps.runs.last_error(chunk.run_id, chunk.seq)
            log.error("chunk %s/%s dead-lettered after %d deliveries: %s", chunk.run_id, chunk.seq,
                      deliveries - 1, reason)
            Recovery(deps.runs.redis, Keys(settings.key_prefix), deps.runs).dead_letter(chunk, deliveries - 1, reason)
            try:
                pending = processor.give_up(chunk, reason)
            except IrliveError:
                raise self.retry(countdown=max_countdown) from None
        else:
            pending = _process(self, deps, processor, chunk, message)
        if pending == 0:
            app.send_task(FINALIZE_RUN, args=[chunk.run_id])

    def _process(task: Task, deps: Deps, processor: ChunkProcessor, chunk: Chunk,
                 message: dict[str, Any]) -> int | None:
        runs = deps.runs
        try:
            return processor.run(chunk)
        except (RateLimited, ChunkBusy) as exc:
            runs.count_delivery(chunk.run_id, chunk.seq, -1)
            countdown = min(max_countdown, getattr(exc, "retry_after", None) or 5.0)
            raise task.retry(countdown=countdown) from None
        except BudgetExhausted as exc:
            runs.count_delivery(chunk.run_id, chunk.seq, -1)
            if runs.pause(chunk.run_id, str(exc)):
                log.warning("run %s paused: %s", chunk.run_id, exc)
            if not runs.park(chunk.run_id, message):
                # Resumed between our failure and the park: go round again.
                raise task.retry(countdown=1.0) from None
            return None
        except ConfigError as exc:
            log.error("run %s stopped: %s", chunk.run_id, exc)
            runs.fail(chunk.run_id, str(exc))
            return None
        except Exception as exc:
            # Transient trouble, or a bug: retry; the delivery count sends a chunk that never heals to the DLQ.
            if not isinstance(exc, IrliveError):
                log.exception("chunk %s/%s: unexpected failure", chunk.run_id, chunk.seq)
            runs.note_error(chunk.run_id, chunk.seq, redact(f"{type(exc).__name__}: {exc}"))
            retries = int(task.request.retries or 0)
            countdown = min(max_countdown, 2.0 * 2 ** min(retries, 8))
            log.warning("chunk %s/%s: %s; retrying in %.0fs", chunk.run_id, chunk.seq, redact(str(exc)), countdown)
            raise task.retry(countdown=countdown) from None

    @app.task(name=FINALIZE_RUN, bind=True, max_retries=10)  # type: ignore[untyped-decorator]
    def finalize(self: Task, run_id: str) -> None:
        deps = lazy.get()
        try:
            finalize_run(deps.runs, deps.storage, deps.wallet, run_id)
        except TransientError:
            raise self.retry(countdown=5.0) from None
