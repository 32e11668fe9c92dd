"""Queues by priority: workers take event chunks first, then nightly scans, then backfills, strictly."""

from __future__ import annotations

import json

from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, upload
from tests.faults import drive_to_completion, live_samples
from tests.test_budget import run_hash


def test_an_event_run_queued_behind_a_backfill_is_judged_first(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, live_samples(300, "backfill"))
    upload(clean_stack, live_samples(10, "arrived", seed=1))
    clean_stack.sandbox_config(latency_ms=300)
    backfill = json.loads(irlive("scan", f"s3://{IN_BUCKET}/backfill", "--priority", "backfill", "--json").stdout)
    urgent = json.loads(irlive("scan", f"s3://{IN_BUCKET}/arrived", "--priority", "events", "--json").stdout)
    client = clean_stack.redis_client()
    assert (client.llen("irlive.backfill"), client.llen("irlive.events")) == (6, 1), "each run on its own queue"

    # One worker slot: whatever it takes first shows the order.
    clean_stack.start_worker(concurrency=1)
    drive_to_completion(clean_stack, urgent["run_id"], deadline_s=60)
    done_before = int(run_hash(clean_stack, backfill["run_id"]).get("done") or 0)
    assert done_before <= 50, f"the event chunk waited behind {done_before} backfill images"
    drive_to_completion(clean_stack, backfill["run_id"], deadline_s=180)

