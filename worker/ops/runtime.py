"""One worker process's clients and background threads: built when the process starts, closed when it stops."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from worker.config import Settings
from worker.errors import IrliveError
from worker.flow.claims import Claims
from worker.flow.intake import Intake
from worker.flow.limiter import RateLimiter, RateSpec
from worker.flow.pipeline import Deps
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.meter import Meter, NullMeter
from worker.money.budgets import Budgets
from worker.money.ledger import Ledger
from worker.money.methods import method_for
from worker.money.pool import PoolKeeper
from worker.money.x402 import X402Payer
from worker.ops import fleet
from worker.ops.broker import Broker, Restore
from worker.ops.metrics import FleetCollector, Metrics, multiprocess_metrics, serve
from worker.ops.periodic import Periodic
from worker.ops.recovery import Recovery
from worker.ops.watchdog import Watchdog
from worker.seams.marketplace import Marketplace
from worker.seams.storage import Storage
from worker.seams.store import Store

log = logging.getLogger("irlive.runtime")
Send = Callable[[str, list[Any]], None]


def build_deps(settings: Settings, meter: Meter | None = None, stopping: threading.Event | None = None) -> Deps:
    """Every long-lived client one worker process needs (also what `irlive wallet` and `smoke` use); `stopping`
    is set when the worker begins a warm shutdown (calls waiting in line give up their wait)."""
    meter = meter or NullMeter()
    keys = Keys(settings.key_prefix)
    store = Store.from_url(settings.redis_url)
    market = Marketplace.for_settings(settings)
    budgets = Budgets(store, keys, settings.daily_budget_cents)
    method, seller = method_for(settings, market, store, keys)
    ledger = Ledger(store, keys, seller, budgets, max_price_cents=settings.max_price_cents,
                    lease_s=token_lease_s(settings), meter=meter,
                    max_unknown_purchases=settings.max_unknown_purchases,
                    pooled=settings.payment_method != "x402")
    if isinstance(method, X402Payer):
        method.on_price_change = ledger.purchaser.forget_quote
    return Deps(
        settings=settings,
        store=store,
        storage=Storage(settings.s3_endpoint_url, settings.s3_region, max_connections=64),
        market=market,
        method=method,
        ledger=ledger,
        limiter=RateLimiter(store, keys, RateSpec(
            settings.rate_limit_per_s, settings.rate_burst, max_in_flight=settings.max_in_flight,
            adaptive=settings.rate_adaptive, max_retry_after_s=settings.max_retry_after_s,
            listing=settings.pool_listing), stopping=stopping),
        runs=Runs(store, keys),
        claims=Claims(store, keys),
        meter=meter,
    )


def token_lease_s(settings: Settings) -> float:
    """How long a lent token may stay reserved or sent before the sweep asks the seller about it."""
    return 2 * settings.call_timeout_s + 30


class Runtime:
    """Built once per worker process (Celery's worker_init for the threads pool, worker_process_init for
    prefork children); `deps()` builds it on first use where neither signal fires (solo, eager tests)."""

    def __init__(self, settings: Settings, send: Send, restore: Restore) -> None:
        self.settings = settings
        self._send = send
        self._restore = restore
        self._lock = threading.Lock()
        self._deps: Deps | None = None
        self._threads: list[Periodic] = []
        self._metrics_server: Any = None
        # Tasks this process runs at once (Celery's concurrency for the threads pool, 1 in a prefork child).
        self.threads: int | None = None
        # Set by Celery's worker_shutting_down: running chunks stop waiting in line (see RateLimiter).
        self.stopping = threading.Event()

    def start(self) -> Deps:
        with self._lock:
            if self._deps is not None:
                return self._deps
            metrics = Metrics() if self.settings.metrics_port else None
            deps = build_deps(self.settings, metrics, self.stopping)
            keys = Keys(self.settings.key_prefix)
            if self.settings.metrics_port and not multiprocess_metrics():
                self._metrics_server = serve(self.settings.metrics_port, metrics,
                                             FleetCollector(deps.store, keys, self.settings.daily_budget_cents,
                                                            self.settings.pool_listing))
            deps.ledger.sweep()
            if self.settings.pool_size > 0:
                self._threads.append(PoolKeeper(deps.ledger, deps.store, keys, size=self.settings.pool_size,
                                                low=self.settings.token_pool_low,
                                                lease_s=token_lease_s(self.settings)))
            self._threads.append(Watchdog(deps.store, keys, deps.runs, Broker(deps.store, restore=self._restore),
                                          self.recovery(deps), self._send, ledger=deps.ledger,
                                          intake=Intake(deps.store, keys, self.settings)))
            for thread in self._threads:
                thread.start()
            fleet.announce(deps.store, keys, self.settings, threads=self.threads)
            self._deps = deps
            return deps

    def serve_pool_metrics(self) -> None:
        """In a prefork pool's main process: serve what its children count (prometheus-client's multi-process
        mode, PROMETHEUS_MULTIPROC_DIR) and the fleet gauges."""
        if not (self.settings.metrics_port and multiprocess_metrics()):
            return
        store = Store.from_url(self.settings.redis_url)
        self._metrics_server = serve(self.settings.metrics_port, None, FleetCollector(
            store, Keys(self.settings.key_prefix), self.settings.daily_budget_cents, self.settings.pool_listing))

    def deps(self) -> Deps:
        return self._deps if self._deps is not None else self.start()

    def recovery(self, deps: Deps | None = None) -> Recovery:
        d = deps or self.deps()
        return Recovery(d.store, Keys(self.settings.key_prefix), d.runs, Broker(d.store, restore=self._restore))

    def stop(self) -> None:
        with self._lock:
            if self._deps is not None:
                with suppress(IrliveError):
                    fleet.leave(self._deps.store, Keys(self.settings.key_prefix))
            for thread in self._threads:
                thread.stop()
            for thread in self._threads:
                thread.join(timeout=5)
            self._threads.clear()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server = None
            if self._deps is not None:
                self._deps.market.close()
                self._deps.store.close()
                self._deps = None
