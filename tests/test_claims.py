"""Image claims across runs, through real workers: overlapping scans pay once per image."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run
from tests.faultproxy import FaultProxy
from tests.faults import check_invariants, drive_to_completion, live_samples, upload_samples
from tests.test_budget import poll
from worker.keys import Keys


def _scan(irlive: IrliveRunner, prefix: str, *args: str) -> str:
    done = irlive("scan", f"s3://{IN_BUCKET}/{prefix}", "--json", *args)
    assert done.returncode == 0, done.stderr
    run_id: str = json.loads(done.stdout)["run_id"]
    return run_id


def test_two_scans_a_second_apart_pay_once_for_each_image(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = live_samples(200, "overlap", seed=5)
    upload_samples(clean_stack, samples)
    # Long enough that no call of the first run answers before the second scan has listed, on a loaded machine too
    # (CI runs tests in parallel); the precondition is checked below, not assumed. Later calls go faster.
    clean_stack.sandbox_config(latency_ms=5000)
    for _ in range(2):
        clean_stack.start_worker(concurrency=8)

    started = time.monotonic()
    first = _scan(irlive, "overlap")
    gap = time.monotonic() - started
    second = _scan(irlive, "overlap")
    clean_stack.sandbox_config(latency_ms=500)
    for run_id in (first, second):
        drive_to_completion(clean_stack, run_id, deadline_s=240)

    problems = check_invariants(clean_stack, [first, second], samples, strict_once=True)
    assert problems == []
    billed = clean_stack.sandbox_ledger()["billed_image_urls_path_counts"]
    assert len(billed) == 200 and set(billed.values()) == {1}, "the seller billed every image exactly once"
    one, two = read_run(clean_stack, first), read_run(clean_stack, second)
    assert two.manifest["skipped"] == 0, (f"the second scan began {gap:.1f}s after the first, when some answers were "
                                          "in already: the overlap this test is about did not happen")
    assert len(one.records) == len(two.records) == 200
    dup_of = Counter((r.get("duplicate_of") or {}).get("run_id") for r in two.records)
    print(f"second scan started {gap:.1f}s after the first; its records: {dict(dup_of)}; "
          f"calls {one.manifest['calls']} + {two.manifest['calls']}")
    assert dup_of == Counter({first: 200}), "every record of the second run is the first run's judgment"
    assert not any(r.get("duplicate_of") for r in one.records)
    assert two.manifest["calls"] == 0 and two.manifest["duplicates"] == 200
    by_key = {r["key"]: r for r in one.records}
    assert all(r["verdict"] == by_key[r["key"]]["verdict"] for r in two.records)


@pytest.mark.slow
def test_a_rescan_while_the_first_is_paused_for_budget_waits_and_pays_nothing_twice(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    """An image claimed by a run that then pauses is not stuck: its claim goes with the paused delivery."""
    samples = live_samples(40, "paused", seed=6)
    upload_samples(clean_stack, samples)
    clean_stack.start_worker(concurrency=4)

    first = _scan(irlive, "paused", "--budget", "0.40")  # two calls: 20 images, then it pauses
    deadline = time.monotonic() + 60
    while json.loads(irlive("status", first, "--json").stdout)["state"] != "paused_budget":
        assert time.monotonic() < deadline, "the first run never paused"
        time.sleep(0.2)
    second = _scan(irlive, "paused")
    drive_to_completion(clean_stack, second, deadline_s=120)

    two = read_run(clean_stack, second)
    billed = clean_stack.sandbox_ledger()["billed_image_urls_path_counts"]
    assert len(billed) == 40 and set(billed.values()) == {1}
    # The 20 the first run judged were skipped at scan time; the other 20 it had claimed came free when it paused.
    assert two.manifest["skipped"] == 20 and len(two.records) == 20
    assert all(r["verdict"] in ("live", "spoof", "no_face") and not r.get("duplicate_of") for r in two.records)


def test_a_worker_killed_between_a_paid_answer_and_its_record_leaves_no_image_for_another_run_to_pay(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    """The claims of an answer paid for but not recorded outlive the killed worker's lease: the rescan waits for
    the first run's chunk to record that answer, and pays nothing."""
    samples = live_samples(10, "pinned", seed=8)
    upload_samples(clean_stack, samples)
    unrecorded = Keys().unrecorded()
    redis = clean_stack.redis_client()
    with FaultProxy.for_url(clean_stack.s3_endpoint) as proxy:
        # The answer is read and written down, then the worker lists the objects (were any overwritten during the
        # call?) before recording: that listing hangs, and the worker is killed there.
        proxy.hold_answer(300.0, match=lambda head: head.startswith(b"GET ") and b"list-type=2" in head)
        first_worker = clean_stack.start_worker(extra_env={"IRLIVE_S3_ENDPOINT_URL": proxy.url}, concurrency=1)
        first = _scan(irlive, "pinned")
        poll(lambda: redis.hlen(unrecorded) == 1, 60, "the paid answer written down in the ledger")
        assert clean_stack.sandbox_ledger()["calls_billed"] == 1
        clean_stack.kill_worker(first_worker)
    second = _scan(irlive, "pinned")
    # This worker reaches S3 directly, so it presigns other URLs than the ones the answer names: it reads the
    # answer back against the URLs written down when the call was sent.
    worker = clean_stack.start_worker()
    for run_id in (first, second):
        drive_to_completion(clean_stack, run_id, deadline_s=180)

    billed = clean_stack.sandbox_ledger()["billed_image_urls_path_counts"]
    assert len(billed) == 10 and set(billed.values()) == {1}, f"an image was paid for twice: {billed}"
    assert "paid by an earlier delivery" in worker.log.read_text(), "the first run's answer was replayed"
    one, two = read_run(clean_stack, first), read_run(clean_stack, second)
    assert one.manifest["calls"] == 1 and two.manifest["calls"] == 0
    assert Counter((r.get("duplicate_of") or {}).get("run_id") for r in two.records) == Counter({first: 10})
    assert check_invariants(clean_stack, [first, second], samples, strict_once=True) == []
    assert redis.hlen(unrecorded) == 0
    assert not redis.keys(f"{Keys().prefix}:claim:*"), "every claim was released by the records"
