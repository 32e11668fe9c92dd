"""Image claims across runs, through real workers: overlapping scans pay once per image."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run
from tests.faults import check_invariants, drive_to_completion, live_samples, upload_samples


def _scan(irlive: IrliveRunner, prefix: str, *args: str) -> str:
    done = irlive("scan", f"s3://{IN_BUCKET}/{prefix}", "--json", *args)
    assert done.returncode == 0, done.stderr
    run_id: str = json.loads(done.stdout)["run_id"]
    return run_id


def test_two_scans_a_second_apart_pay_once_for_each_image(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = live_samples(200, "overlap", seed=5)
    upload_samples(clean_stack, samples)
    clean_stack.sandbox_config(latency_ms=1500)
    for _ in range(2):
        clean_stack.start_worker(concurrency=8)

    started = time.monotonic()
    first = _scan(irlive, "overlap")
    gap = time.monotonic() - started
    second = _scan(irlive, "overlap")
    for run_id in (first, second):
        drive_to_completion(clean_stack, run_id, deadline_s=240)

    problems = check_invariants(clean_stack, [first, second], samples, strict_once=True)
    assert problems == []
    billed = clean_stack.sandbox_ledger()["billed_image_urls_path_counts"]
    assert len(billed) == 200 and set(billed.values()) == {1}, "the seller billed every image exactly once"
    one, two = read_run(clean_stack, first), read_run(clean_stack, second)
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
