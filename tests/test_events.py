"""Queue-triggered jobs on real parts: S3 -> SQS notifications (moto_server), `irlive listen`, Redis, workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox import procs
from sandbox.images import Sample, png
from sandbox.stack import Stack
from tests.conftest import IRLIVE_BIN, run_irlive
from tests.e2e import IN_BUCKET, OUT_BUCKET, OUT_PREFIX
from worker.judge.manifest import split_identities

QUEUE = "irlive-events"


@dataclass
class Events:
    """The stack's SQS queue wired to the input bucket's ObjectCreated notifications."""

    stack: Stack
    sqs: Any
    url: str

    def counts(self) -> tuple[int, int]:
        attrs = self.sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


@pytest.fixture
def events(clean_stack: Stack) -> Events:
    url = clean_stack.event_queue(IN_BUCKET, QUEUE)
    return Events(clean_stack, clean_stack.sqs_client(), url)


@pytest.fixture
def listener(events: Events, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    yield from start_listener(events.stack, tmp_path / "listener.log")


def start_listener(stack: Stack, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [str(IRLIVE_BIN), "listen", f"sqs://{QUEUE}", "--json", "--wait", "1"],
        env={**os.environ, **stack.env, **(env or {})}, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        yield proc
    finally:
        procs.kill_group(proc, signal.SIGTERM, timeout=20)


def event_records(stack: Stack) -> dict[str, list[dict[str, Any]]]:
    """Every record of every event run's chunk manifests so far, by key."""
    s3 = stack.s3_client()
    found: dict[str, list[dict[str, Any]]] = {}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=OUT_BUCKET, Prefix=f"{OUT_PREFIX}/runs/ev-")
    for page in pages:
        for obj in page.get("Contents", ()):
            if "/chunks/" in obj["Key"]:
                doc = json.loads(s3.get_object(Bucket=OUT_BUCKET, Key=obj["Key"])["Body"].read())
                run_id = obj["Key"].removeprefix(f"{OUT_PREFIX}/runs/").split("/", 1)[0]
                for record in doc["images"]:
                    found.setdefault(record["key"], []).append({**record, "_run": run_id})
    return found


def wait_for_records(stack: Stack, keys: set[str], deadline_s: float) -> dict[str, list[dict[str, Any]]]:
    deadline = time.monotonic() + deadline_s
    while True:
        found = event_records(stack)
        if keys <= set(found):
            return found
        assert time.monotonic() < deadline, f"{len(keys - set(found))} images without a record, e.g. " \
                                            f"{sorted(keys - set(found))[:3]}"
        time.sleep(0.5)


def stream_samples() -> tuple[list[Sample], list[Sample]]:
    """200 captures with awkward keys and 10 objects that are not images."""
    images = []
    for i in range(200):
        name = ("scan day " if i % 3 == 0 else "a+b " if i % 3 == 1 else "caméra-ü ") + f"{i:03d}.png"
        images.append(Sample(f"cam/{name}", png(96, 96, ("live", "spoof", "no_face")[i % 3], seed=500 + i),
                             ("live", "spoof", "no_face")[i % 3]))
    junk = [Sample(f"cam/not an image {i}.png", b"just text, named .png", "rejected") for i in range(10)]
    return images, junk


def test_a_stream_of_events_ends_in_one_record_each_at_the_call_floor(
        events: Events, listener: subprocess.Popen[str]) -> None:
    stack = events.stack
    for _ in range(2):
        stack.start_worker(concurrency=8)
    images, junk = stream_samples()
    again = images[:20]  # put a second time, same bytes: the same identity, announced twice
    puts = [*images, *junk, *again]
    assert len(puts) == 230
    s3 = stack.s3_client()
    events.sqs.send_message(QueueUrl=events.url, MessageBody="{not an S3 event at all")
    started = time.monotonic()
    for n, sample in enumerate(puts):
        s3.put_object(Bucket=IN_BUCKET, Key=sample.key, Body=sample.body)
        # Spread over ~20 s, as captures arrive (pacing the producer, not waiting on the system).
        time.sleep(max(0.0, started + 20 * (n + 1) / len(puts) - time.monotonic()))

    found = wait_for_records(stack, {s.key for s in [*images, *junk]}, deadline_s=120)
    # One record each in a window's run. Windows follow the clock's hours: a stream that crosses hh:00 (a CI run
    # at 09:00 did) puts a re-announced image into the next window's run as well, recorded there as a duplicate
    # of the first judgment (paid once: the bill is checked below), and only those.
    twice = {k: v for k, v in found.items() if len(v) != 1}
    for key, records in twice.items():
        assert len(records) == 2 and key in {s.key for s in again}, f"one record each: {key} has {len(records)}"
        first, later = sorted(records, key=lambda r: str(r["_run"]))
        assert first["_run"] != later["_run"] and later.get("duplicate_of"), f"{key} judged twice: {records}"
        found[key] = [first]
    print(f"{len(twice)} re-announced images also in the next window's run")
    assert all(found[s.key][0]["verdict"] == s.expected for s in images)
    assert all(found[s.key][0]["verdict"] == "rejected" for s in junk)
    ledger = stack.sandbox_ledger()
    billed = ledger["billed_image_urls_path_counts"]
    assert len(billed) == 200 and set(billed.values()) == {1}, "each valid image billed once"
    print(f"{ledger['calls_billed']} calls for 200 images over {time.monotonic() - started:.1f}s")
    assert ledger["calls_billed"] / 200 <= 0.11
    visible, in_flight = events.counts()
    assert visible + in_flight == 1, "the unreadable message stays on the queue for its dead-letter queue"


def test_a_lone_event_is_judged_within_seconds_and_its_window_run_finalises(
        events: Events, tmp_path: Path) -> None:
    stack = events.stack
    env = {"IRLIVE_EVENT_RUN_WINDOW": "60"}  # a one-minute window, so this test sees it close
    stack.start_worker(extra_env=env)
    gen = start_listener(stack, tmp_path / "listener.log", env)
    next(gen)
    try:
        started = time.monotonic()
        stack.s3_client().put_object(Bucket=IN_BUCKET, Key="cam/lone.png", Body=png(96, 96, "live", seed=9))
        found = wait_for_records(stack, {"cam/lone.png"}, deadline_s=60)
        latency = time.monotonic() - started
        assert found["cam/lone.png"][0]["verdict"] == "live"
        print(f"lone event judged {latency:.1f}s after its put")
        client = stack.redis_client()
        runs = [r.decode() for r in client.zrange("irlive:runs", 0, -1) if r.decode().startswith("ev-")]
        assert len(runs) == 1
        deadline = time.monotonic() + 150
        while client.hget(f"irlive:run:{runs[0]}", "state") != b"done":
            assert time.monotonic() < deadline, f"the window run never finished: {runs[0]}"
            time.sleep(0.5)
        manifest = json.loads(stack.s3_client().get_object(
            Bucket=OUT_BUCKET, Key=f"{OUT_PREFIX}/runs/{runs[0]}/manifest.json")["Body"].read())
        assert manifest["images"] == 1 and manifest["counts"]["live"] == 1 and manifest["calls"] == 1
        # A window run has its report and results like any other run.
        page = stack.s3_client().get_object(Bucket=OUT_BUCKET, Key=manifest["report"])["Body"].read().decode()
        assert runs[0] in page and 'id="images">1<' in page
        assert manifest["results"]["csv"].endswith(f"runs/{runs[0]}/results.csv")
    finally:
        gen.close()


def test_replayed_and_duplicate_events_pay_once(events: Events, listener: subprocess.Popen[str]) -> None:
    stack = events.stack
    stack.start_worker()
    s3 = stack.s3_client()
    s3.put_object(Bucket=IN_BUCKET, Key="cam/x.png", Body=png(96, 96, "spoof", seed=3))
    etag = s3.head_object(Bucket=IN_BUCKET, Key="cam/x.png")["ETag"].strip('"')
    # The same event delivered again (at-least-once), once straight and once through SNS.
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
              "s3": {"bucket": {"name": IN_BUCKET}, "object": {"key": "cam/x.png", "eTag": etag}}}
    events.sqs.send_message(QueueUrl=events.url, MessageBody=json.dumps({"Records": [record]}))
    events.sqs.send_message(QueueUrl=events.url, MessageBody=json.dumps(
        {"Type": "Notification", "Message": json.dumps({"Records": [record]})}))
    wait_for_records(stack, {"cam/x.png"}, deadline_s=60)
    deadline = time.monotonic() + 30
    while sum(events.counts()) > 0:
        assert time.monotonic() < deadline, "every message was handled and deleted"
        time.sleep(0.2)
    assert [r["verdict"] for r in event_records(stack)["cam/x.png"]] == ["spoof"]
    assert Counter(stack.sandbox_ledger()["billed_image_urls_path_counts"].values()) == Counter({1: 1})


@pytest.mark.slow
def test_killing_the_listener_and_a_worker_mid_stream_loses_no_event_and_pays_nothing_twice(
        events: Events, tmp_path: Path) -> None:
    stack = events.stack
    for _ in range(2):
        stack.start_worker(concurrency=4)
    stack.sandbox_config(latency_ms=300)
    images = [Sample(f"kill/img {i:03d}.png", png(96, 96, "live", seed=900 + i), "live") for i in range(120)]
    listeners = [start_listener(stack, tmp_path / "listener-1.log")]
    first = next(listeners[0])
    s3 = stack.s3_client()
    started = time.monotonic()
    for n, sample in enumerate(images):
        s3.put_object(Bucket=IN_BUCKET, Key=sample.key, Body=sample.body)
        if n == 40:
            # The listener dies between receiving and deleting: whatever it had not buffered comes back from SQS.
            procs.kill_group(first, signal.SIGKILL)
            listeners.append(start_listener(stack, tmp_path / "listener-2.log"))
            next(listeners[-1])
        if n == 80:
            stack.kill_worker(stack.workers[0])
            stack.start_worker(concurrency=4)
        time.sleep(max(0.0, started + 12 * (n + 1) / len(images) - time.monotonic()))
    try:
        found = wait_for_records(stack, {s.key for s in images}, deadline_s=180)
    finally:
        for gen in listeners:
            gen.close()
    assert {k: len(v) for k, v in found.items() if len(v) != 1} == {}
    # A call in flight on the killed worker is `sent` until the sweep asks the seller about it (its token's lease
    # outlasts the chunk's, which another worker resumed): settle every open token, as check_invariants does.
    stack.stop_workers()
    rec = run_irlive(stack, "wallet", "--reconcile", "--all", "--json")
    assert rec.returncode == 0, rec.stderr
    billed = stack.sandbox_ledger()["billed_image_urls_path_counts"]
    client = stack.redis_client()
    lost: Counter[str] = Counter()
    for key in client.scan_iter("irlive:pay:pay_*"):
        payment = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        if payment.get("lost") == "1":
            lost.update("/" + i.rsplit("@", 1)[0].replace(" ", "%20")
                        for i in split_identities(payment.get("images", "")))
    twice = {k: n for k, n in billed.items() if n > 1 + lost.get(k, 0)}
    assert len(billed) == 120 and twice == {}, f"paid again with no lost answer to explain it: {twice}"


def test_the_listener_serves_its_counts_and_the_fleet_gauges(events: Events, tmp_path: Path) -> None:
    stack = events.stack
    port = procs.free_port()
    gen = start_listener(stack, tmp_path / "listener.log", {"IRLIVE_METRICS_PORT": str(port)})
    next(gen)

    def scrape() -> dict[str, float] | None:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        found = {}
        for line in text.splitlines():
            if line.startswith(("irlive_listener_events_total{", "irlive_queue_depth{", "irlive_runs{")):
                name, _, value = line.rpartition(" ")
                found[name] = float(value)
        return found

    try:
        procs.wait_until(lambda: scrape() is not None, 30, "the listener's /metrics to answer")
        # Counted from here: the queue may still deliver an earlier test's notifications.
        before = scrape() or {}
        buffered, filtered = ('irlive_listener_events_total{what="buffered"}',
                              'irlive_listener_events_total{what="filtered"}')
        for i in range(3):
            stack.s3_client().put_object(Bucket=IN_BUCKET, Key=f"cam/m{i}.png", Body=png(96, 96, "live", seed=i))
        stack.s3_client().put_object(Bucket=IN_BUCKET, Key="cam/notes.txt", Body=b"not an image")
        seen: dict[str, float] = {}

        def counted() -> bool:
            seen.update(scrape() or {})
            return (seen.get(buffered, 0) - before.get(buffered, 0) >= 3
                    and seen.get(filtered, 0) - before.get(filtered, 0) >= 1)
        procs.wait_until(counted, 60, "the listener's /metrics to count 3 more images buffered and 1 filtered")
        assert seen['irlive_runs{state="listing"}'] >= 1.0, seen  # the window's run, read from Redis
        assert 'irlive_queue_depth{queue="irlive.events"}' in seen
    finally:
        gen.close()
