"""Prometheus metrics: what a worker counts, and a real run scraped while it goes and checked against the seller."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sandbox import procs
from sandbox.images import demo_corpus
from sandbox.procs import free_port, wait_until
from sandbox.stack import Stack
from tests.conftest import IRLIVE_BIN, IrliveRunner
from tests.e2e import IN_BUCKET, SECRET_PATTERNS, upload
from worker.keys import Keys
from worker.ops.metrics import Metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_process_counts_money_calls_images_and_waits() -> None:
    metrics = Metrics()
    metrics.money("bought", 40)
    metrics.money("spent", 20)
    metrics.money("unknown", 20)
    metrics.call("answered", 0.2)
    metrics.call("throttled", 0.01)
    metrics.images("live", 9)
    metrics.images("duplicate", 1)
    metrics.limiter_wait(0.3)
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "irlive_money_cents_total", kind="bought") == 40
    assert value(samples, "irlive_money_cents_total", kind="unknown") == 20
    assert value(samples, "irlive_answers_lost_total") == 1
    assert value(samples, "irlive_calls_total", outcome="throttled") == 1
    assert value(samples, "irlive_throttles_total") == 1
    assert value(samples, "irlive_images_total", verdict="live") == 9
    # Only calls that reached an answer or an error time the seller; a throttle is not its latency.
    assert value(samples, "irlive_call_duration_seconds_count") == 1
    assert value(samples, "irlive_limiter_wait_seconds_count") == 1


@pytest.mark.integration
def test_a_real_run_scraped_while_it_goes_ends_with_money_equal_to_the_sellers_ledger(
    clean_stack: Stack, irlive: IrliveRunner
) -> None:
    corpus = demo_corpus(120, seed=5)
    upload(clean_stack, corpus)
    ports = [free_port(), free_port()]
    for port in ports:
        # Two calls a second: the run lasts long enough to be seen going.
        clean_stack.start_worker(extra_env={"IRLIVE_METRICS_PORT": str(port), "IRLIVE_RATE_LIMIT_PER_S": "4"})

    def scrape(port: int) -> str:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    during: list[Samples] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            samples = parse(scrape(ports[0]))
            if value(samples, "irlive_calls_total", outcome="answered") > 0:
                during.append(samples)
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    scanned = irlive("scan", f"s3://{IN_BUCKET}/captures", "--json")
    assert scanned.returncode == 0, scanned.stderr
    run_id = json.loads(scanned.stdout)["run_id"]
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "240", timeout=270)
    stop.set()
    watcher.join(5)
    assert json.loads(waited.stdout)["state"] == "done", waited.stdout
    assert during, "the first worker's /metrics showed no answered call while the run went"
    live = during[0]
    assert value(live, "irlive_runs", state="running") == 1
    assert value(live, "irlive_queue_depth", queue="irlive.nightly") >= 0

    texts = [scrape(port) for port in ports]
    assert not any(SECRET_PATTERNS.search(text) for text in texts)
    fleet = [parse(text) for text in texts]
    ledger = clean_stack.sandbox_ledger()
    price = 20

    def total(name: str, **labels: str) -> float:
        return sum(value(samples, name, **labels) for samples in fleet)

    # Counters are each worker's own: their sum is the fleet's, and it is what the seller billed.
    assert total("irlive_money_cents_total", kind="bought") == ledger["payments_created"] * price
    assert total("irlive_money_cents_total", kind="spent") == ledger["calls_billed"] * price
    assert total("irlive_calls_total", outcome="answered") == ledger["calls_billed"]
    assert total("irlive_images_total") == 0  # no sample without its verdict label
    judged = sum(total("irlive_images_total", verdict=v) for v in ("live", "spoof", "no_face", "rejected"))
    assert judged == len(corpus)
    # Gauges are the fleet's, read from Redis at the scrape: once the pool keeper is idle, every worker reports
    # the same, and what Redis holds.
    client = clean_stack.redis_client()

    def same_everywhere() -> bool:
        seen = [parse(scrape(p)) for p in ports]
        pool = {value(x, "irlive_token_pool") for x in seen} | {float(client.llen(Keys("irlive").pool()))}
        return len(pool) == 1 and {value(x, "irlive_runs", state="done") for x in seen} == {1.0}

    wait_until(same_everywhere, 15, "both workers to report the fleet's token pool and the done run")
    client.close()


@pytest.mark.integration
def test_a_scan_that_waits_serves_what_it_listed(clean_stack: Stack) -> None:
    upload(clean_stack, demo_corpus(30, seed=8))
    port = free_port()
    scan = subprocess.Popen([str(IRLIVE_BIN), "scan", f"s3://{IN_BUCKET}/captures", "--wait", "--json"],
                            env={**os.environ, **clean_stack.env, "IRLIVE_METRICS_PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        seen: Samples = {}

        def listed() -> bool:
            try:
                seen.update(parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text))
            except httpx.HTTPError:
                return False
            # The run turns `running` once its listing is recorded, a moment after the last chunk is enqueued.
            return (value(seen, "irlive_scan_images_total", what="enqueued") == 30
                    and value(seen, "irlive_runs", state="running") == 1)

        # No worker runs: the scan has listed and enqueued everything and waits, serving its figures.
        wait_until(listed, 60, "the waiting scan's /metrics to count 30 images enqueued and its run running")
        assert value(seen, "irlive_scan_images_total", what="chunks") == 1
        assert value(seen, "irlive_queue_depth", queue="irlive.nightly") == 1
    finally:
        procs.kill_group(scan, signal.SIGTERM, timeout=10)
