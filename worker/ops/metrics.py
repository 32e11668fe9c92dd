"""Prometheus metrics: what this process counted (the Meter the core reports to) and, read from Redis at each
scrape, the fleet's state (queues, in-flight calls, the token pool, budgets, runs), served on one HTTP port.

Counters and histograms are this process's own: sum them over the fleet. Gauges are fleet-wide values every
worker reads from the same Redis: aggregate them with max(). With Celery's prefork pool, set
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multi-process mode): the children write their counters to files
there and the main process serves them all.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from worker.errors import IrliveError
from worker.flow.states import RunState
from worker.keys import Keys
from worker.messages import QUEUES
from worker.money.budgets import today
from worker.seams.store import Store

log = logging.getLogger("irlive.metrics")
# Seconds: a call answers within the call timeout (30 s by default); a chunk of 50 takes minutes at 2 calls/s.
CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
CHUNK_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
# Runs looked at per scrape: the most recent ones (a fleet keeps a week of runs in Redis).
MAX_RUNS_SCRAPED = 500
_LIVE_STATES = (RunState.LISTING, RunState.RUNNING, RunState.PAUSED, RunState.PAUSED_BUDGET)


class Metrics:
    """The Meter of one worker process (thread-safe: prometheus-client's metrics are)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._images = PromCounter("irlive_images", "Image records saved, by verdict (duplicate: recorded "
                                   "from an earlier judgment at no cost)", ["verdict"], registry=r)
        self._calls = PromCounter("irlive_calls", "Paid calls ended, by outcome", ["outcome"], registry=r)
        self._money = PromCounter("irlive_money_cents", "US cents by what became of them: bought, spent, "
                                  "returned to the pool unused, released (x402 signatures the seller did not "
                                  "settle), void, unknown (spent, answer lost)", ["kind"], registry=r)
        self._throttles = PromCounter("irlive_throttles", "Calls the seller throttled (429)", registry=r)
        self._deliveries = PromCounter("irlive_deliveries", "Chunk deliveries taken, by queue", ["queue"],
                                       registry=r)
        self._dead = PromCounter("irlive_dead_letters", "Chunks dead-lettered", registry=r)
        self._download_retries = PromCounter(
            "irlive_download_retries", "Calls refused for a download the seller could not make, sent once more "
            "whole before being split (a sign of the storage more often than of the images)", registry=r)
        self._lost = PromCounter("irlive_answers_lost", "Paid calls whose answer never reached the ledger",
                                 registry=r)
        self._call_s = PromHistogram("irlive_call_duration_seconds", "Seller call latency", buckets=CALL_BUCKETS,
                                     registry=r)
        self._chunk_s = PromHistogram("irlive_chunk_duration_seconds", "One chunk delivery, start to end",
                                      buckets=CHUNK_BUCKETS, registry=r)
        self._wait_s = PromHistogram("irlive_limiter_wait_seconds", "Time waiting for the global rate limit",
                                     buckets=WAIT_BUCKETS, registry=r)

    def money(self, kind: str, cents: int) -> None:
        self._money.labels(kind).inc(cents)
        if kind == "unknown":
            self._lost.inc()

    def call(self, outcome: str, seconds: float) -> None:
        self._calls.labels(outcome).inc()
        if outcome == "throttled":
            self._throttles.inc()
        if outcome in ("answered", "failed"):
            self._call_s.observe(seconds)

    def images(self, verdict: str, n: int) -> None:
        self._images.labels(verdict).inc(n)

    def limiter_wait(self, seconds: float) -> None:
        self._wait_s.observe(seconds)

    def chunk(self, seconds: float) -> None:
        self._chunk_s.observe(seconds)

    def delivery(self, queue: str) -> None:
        self._deliveries.labels(queue).inc()

    def dead_letter(self) -> None:
        self._dead.inc()

    def download_retry(self) -> None:
        self._download_retries.inc()


class FleetCollector(Collector):
    """Gauges read from Redis when Prometheus scrapes; a Redis that does not answer leaves them out."""

    def __init__(self, store: Store, keys: Keys, daily_cap_cents: int | None, pool_listing: str = "") -> None:
        self._store = store
        self._keys = keys
        self._daily_cap = daily_cap_cents
        self._pool = keys.pool(pool_listing)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            yield from self._collect()
        except IrliveError as exc:
            log.warning("fleet metrics left out of this scrape: %s", exc)

    def _collect(self) -> Iterator[GaugeMetricFamily]:
        store, keys = self._store, self._keys
        state: dict[str, str] = store.hgetall(keys.ratelimit_state())
        yield _gauge("irlive_calls_in_flight", "Calls holding an in-flight slot now",
                     float(store.zcard(keys.ratelimit_slots())))
        if state.get("rate"):
            yield _gauge("irlive_limiter_rate_per_s", "The global limiter's effective rate", float(state["rate"]))
        depth = GaugeMetricFamily("irlive_queue_depth", "Chunk messages waiting in each queue", labels=["queue"])
        for queue in QUEUES.values():
            depth.add_metric([queue], float(store.llen(queue)))
        yield depth
        yield _gauge("irlive_token_pool", "Prepaid tokens waiting in the shared pool (of this fleet's listing)",
                     float(store.llen(self._pool)))
        replicas = store.replicas_online()
        if replicas is not None:
            online, wanted = replicas
            yield _gauge("irlive_redis_replicas", "Replicas of the Redis master online now (Sentinel)", float(online))
            yield _gauge("irlive_redis_replicas_wanted", "Replicas every write waits for (wait_replicas): with "
                         "fewer online, writes are held and runs stand still", float(wanted))
        yield from self._runs()

    def _runs(self) -> Iterator[GaugeMetricFamily]:
        store, keys = self._store, self._keys
        run_ids = store.zrevrange(keys.runs(), 0, MAX_RUNS_SCRAPED - 1)
        pipe = store.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hmget(keys.run(run_id), ["state", "budget_cents", "committed_cents", "done", "pending"])
        rows = pipe.execute() if run_ids else []
        states: Counter[str] = Counter()
        budget = GaugeMetricFamily("irlive_budget_left_cents", "Budget not yet committed: per live run with a "
                                   "budget, and today's fleet cap", labels=["scope", "run_id"])
        images = GaugeMetricFamily("irlive_run_images", "Images recorded so far by each live run",
                                   labels=["run_id", "state"])
        pending = GaugeMetricFamily("irlive_run_pending_chunks", "Chunks each live run still waits for",
                                    labels=["run_id"])
        for run_id, (state, cap, committed, done, left) in zip(run_ids, rows, strict=True):
            if not state:
                continue
            states[state] += 1
            if state not in _LIVE_STATES:
                continue
            if cap:
                budget.add_metric(["run", run_id], float(int(cap) - int(committed or 0)))
            images.add_metric([run_id, state], float(done or 0))
            pending.add_metric([run_id], float(max(0, int(left or 0))))
        if self._daily_cap is not None:
            bought = int(store.hget(keys.day(today()), "bought_cents") or 0)
            budget.add_metric(["day", ""], float(self._daily_cap - bought))
        by_state = GaugeMetricFamily("irlive_runs", "Runs kept in Redis, by state", labels=["state"])
        for state in RunState:
            by_state.add_metric([str(state)], float(states.get(str(state), 0)))
        yield from (by_state, budget, images, pending)


class CountsCollector(Collector):
    """A process's running counts (such as the listener's) as one counter family, labelled by what they count."""

    def __init__(self, name: str, doc: str, counts: Callable[[], Mapping[str, int]]) -> None:
        self._name = name
        self._doc = doc
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=["what"])
        for what, n in self._counts().items():
            family.add_metric([what], float(n))
        yield family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def multiprocess_metrics() -> bool:
    """prometheus-client's multi-process mode (prefork children write files the main process serves)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def serve(port: int, metrics: Metrics | None, fleet: FleetCollector, *more: Collector) -> Any:
    """Serve /metrics on `port` (all interfaces); returns the server, or None if the port is taken (logged)."""
    registry = CollectorRegistry()
    if multiprocess_metrics():
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    elif metrics is not None:
        registry.register(_Forward(metrics.registry))
    registry.register(fleet)
    for collector in more:
        registry.register(collector)
    try:
        server, _thread = start_http_server(port, registry=registry)
    except OSError as exc:
        log.warning("metrics not served: port %d: %s", port, exc)
        return None
    log.info("metrics on :%d/metrics", port)
    return server


class _Forward(Collector):
    """This process's own metrics, next to the fleet gauges in the served registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        yield from self._registry.collect()
