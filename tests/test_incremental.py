"""Incremental and scheduled scans end to end: --since last, an S3 Inventory source, single flight per source."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from bench.inventory_memory import write_inventory
from sandbox.images import png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run, validator
from worker.flow.runs import Runs
from worker.flow.states import RunState
from worker.flow.watermarks import Watermarks, parse_utc
from worker.keys import Keys
from worker.seams.store import Store

pytestmark = pytest.mark.integration

SOURCE = f"s3://{IN_BUCKET}/nightly"


def _put(stack: Stack, keys: list[str], seed: int) -> dict[str, str]:
    """Upload a distinct small capture at each key; returns key -> ETag."""
    s3 = stack.s3_client()
    return {k: str(s3.put_object(Bucket=IN_BUCKET, Key=k, Body=png(64, 64, "live", seed=seed + i))["ETag"]).strip('"')
            for i, k in enumerate(keys)}


def _scan(irlive: IrliveRunner, *args: str) -> dict[str, Any]:
    done = irlive("scan", *args, "--json")
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def _wait_done(irlive: IrliveRunner, run_id: str, timeout: float = 180) -> None:
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", str(timeout), timeout=timeout + 30)
    assert waited.returncode == 0, waited.stderr
    assert json.loads(waited.stdout)["state"] == "done", waited.stdout


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _clients(stack: Stack) -> tuple[Runs, Watermarks]:
    store = Store.from_url(stack.redis_url)
    return Runs(store, Keys()), Watermarks(store, Keys())


def test_a_rescan_since_last_judges_exactly_the_new_and_rewritten_images(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    old = [f"nightly/2026/11/29/old_{i:03d}.png" for i in range(30)]
    _put(clean_stack, old, seed=0)
    clean_stack.start_worker()
    runs, marks = _clients(clean_stack)

    first = _scan(irlive, SOURCE, "--since", "last", "--priority", "nightly")
    assert first["enqueued"] == 30, "no watermark yet: the first scheduled scan takes everything"
    _wait_done(irlive, first["run_id"])
    run1 = runs.get(first["run_id"])
    assert run1 is not None and run1["watermark_source"] == SOURCE
    # Finalisation advances the source's watermark to the first listing's upper bound when the run ends done.
    _until(lambda: marks.get(SOURCE) is not None, 30, "the watermark to advance")
    assert marks.get(SOURCE) == parse_utc(run1["watermark_to"])

    new = [f"nightly/2026/11/30/new_{i:03d}.png" for i in range(50)]
    rewritten = old[::6]
    assert len(rewritten) == 5
    _put(clean_stack, new, seed=1000)
    _put(clean_stack, rewritten, seed=2000)  # new content, so a new ETag: the same key is a new image
    changed = set(new) | set(rewritten)

    # With no overlap the listing itself yields exactly the 55 written since the first scan started.
    dry = irlive("scan", SOURCE, "--since", "last", "--dry-run", "--json", env={"IRLIVE_SINCE_OVERLAP_S": "0"})
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["found"] == 55

    # The shipped settings list 15 minutes further back (all of this test's objects); the done-set takes the
    # unchanged ones out before anything is enqueued: exactly the 55 are candidates, none of the 25 is.
    second = _scan(irlive, SOURCE, "--since", "last", "--priority", "nightly")
    assert second["enqueued"] == 55, second
    assert second["found"] - second["already_judged"] == 55
    run2 = runs.get(second["run_id"])
    assert run2 is not None
    assert run2["settings"]["since"] == parse_utc(run1["watermark_to"]).isoformat(), \
        "the rescan starts from the first run's watermark"
    _wait_done(irlive, second["run_id"])
    records = read_run(clean_stack, second["run_id"]).records
    assert sorted(r["key"] for r in records) == sorted(changed), "no unchanged image is reconsidered"
    assert all(r["verdict"] == "live" and not r.get("duplicate_of") for r in records)
    _until(lambda: marks.get(SOURCE) == parse_utc(run2["watermark_to"]), 30, "the watermark to move on")

    # A night that fails does not move the watermark: the next `--since last` lists its images again.
    late = [f"nightly/2026/12/01/late_{i:02d}.png" for i in range(3)]
    _put(clean_stack, late, seed=3000)
    clean_stack.sandbox_config(p_5xx=1.0)  # the seller fails every call
    failing = irlive("scan", SOURCE, "--since", "last", "--min-calls", "1", "--wait", "--json", timeout=150)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    third = json.loads(failing.stdout.splitlines()[0])
    _until(lambda: bool((runs.get(third["run_id"]) or {}).get("finalised_at")), 60, "the failed run's manifest")
    assert (runs.get(third["run_id"]) or {})["state"] == "failed"
    assert marks.get(SOURCE) == parse_utc(run2["watermark_to"]), "a failed run does not move the watermark"
    clean_stack.sandbox_config(p_5xx=0.0)
    again = _scan(irlive, SOURCE, "--since", "last")
    assert again["enqueued"] == 3, again
    _wait_done(irlive, again["run_id"])
    assert sorted(r["key"] for r in read_run(clean_stack, again["run_id"]).records) == late


def test_an_inventory_drives_a_judged_run_end_to_end(clean_stack: Stack, irlive: IrliveRunner) -> None:
    # Three report files of 120 rows (the last one short), every 100th key with a space.
    keys = [f"inv/day {i % 4}/img_{i:04d}.png" if i % 100 == 0 else f"inv/d{i % 4}/img_{i:04d}.png"
            for i in range(300)]
    etags = _put(clean_stack, keys, seed=0)
    s3 = clean_stack.s3_client()
    s3.create_bucket(Bucket="irlive-inventory")
    manifest = write_inventory(s3, "irlive-inventory", IN_BUCKET,
                               [(IN_BUCKET, k, 1, etags[k]) for k in keys], rows_per_file=120)
    clean_stack.start_worker()
    clean_stack.start_worker()

    scanned = _scan(irlive, f"inventory://irlive-inventory/{manifest}")
    assert (scanned["found"], scanned["enqueued"], scanned["bad_rows"]) == (300, 300, 0)
    _wait_done(irlive, scanned["run_id"], timeout=300)

    run = read_run(clean_stack, scanned["run_id"])
    assert sorted(r["key"] for r in run.records) == sorted(keys), "keys with spaces are decoded from the CSV"
    assert {r["etag"] for r in run.records} == set(etags.values())
    assert run.manifest["counts"]["live"] == 300
    validator("run").validate(run.manifest)
    again = _scan(irlive, f"inventory://irlive-inventory/{manifest}", "--dry-run")
    assert (again["already_judged"], again["to_judge"]) == (300, 0), "an inventory's ETags meet the done-set"


def test_a_scheduled_scan_of_a_source_still_being_judged_exits_4_and_creates_nothing(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    _put(clean_stack, [f"nightly/a_{i}.png" for i in range(3)], seed=0)
    runs, marks = _clients(clean_stack)
    # No worker: the first run stays `running` with its chunk in the queue.
    first = _scan(irlive, SOURCE, "--since", "last")
    assert runs.state(first["run_id"]) == "running"
    count = clean_stack.redis_client().zcard(Keys().runs())

    held = irlive("scan", SOURCE, "--since", "last", "--json")
    assert held.returncode == 4, held.stderr
    assert first["run_id"] in held.stderr
    assert clean_stack.redis_client().zcard(Keys().runs()) == count, "no run was created"
    assert marks.holder(SOURCE) == first["run_id"]

    # Another source, or an unscheduled scan, is not held back.
    assert irlive("scan", f"{SOURCE}/a_0.png-nothing", "--since", "last", "--json").returncode == 0
    assert irlive("scan", SOURCE, "--json").returncode == 0

    # Once the holder has ended (here: failed), the next scheduled scan takes the source over.
    runs.set_state(first["run_id"], RunState.FAILED)
    taken = _scan(irlive, SOURCE, "--since", "last")
    assert marks.holder(SOURCE) == taken["run_id"]
