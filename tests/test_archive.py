"""A finished run leaves Redis almost nothing per image; `irlive reindex` rebuilds the done-set from S3."""

from __future__ import annotations

import json

from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, OUT_BUCKET, read_run, upload
from tests.test_budget import clean_samples
from tests.test_e2e import scan_and_wait


def _keys(stack: Stack) -> list[str]:
    return sorted(k.decode() for k in stack.redis_client().scan_iter("irlive:*", count=1000))


def test_a_finished_run_keeps_only_its_done_set_entries_and_its_payments_go_to_s3(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(200))
    clean_stack.start_worker(concurrency=8)
    run_id = scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean")
    run = read_run(clean_stack, run_id)

    keys = _keys(clean_stack)
    per_run = [k for k in keys if k.startswith(f"irlive:run:{run_id}:")]
    assert per_run == [], f"per-chunk and per-run state left after finalisation: {per_run[:5]}"
    client = clean_stack.redis_client()
    spent_left = [k for k in keys if k.startswith("irlive:pay:") and client.hget(k, "state") == b"spent"]
    assert spent_left == [], "spent payments are archived to S3, not kept in Redis"
    done_entries = sum(client.hlen(k) for k in keys if k.startswith("irlive:done:"))
    assert done_entries == 2 * 200, "one entry per judged image, and one per content (for copies to find)"

    body = clean_stack.s3_client().get_object(Bucket=OUT_BUCKET, Key=run.manifest["payments"]["key"])["Body"].read()
    payments = [json.loads(line) for line in body.decode().splitlines()]
    assert len(payments) == run.manifest["payments"]["count"] == run.manifest["calls"] == 20
    assert all(p["state"] == "spent" and p["request_id"] and "token" not in p for p in payments)
    status = json.loads(irlive("status", run_id, "--json").stdout)
    assert (status["state"], status["done"], status["calls"]) == ("done", 200, 20), "status still answers"


def test_reindex_after_redis_lost_everything_makes_a_rescan_pay_nothing(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(120))
    clean_stack.start_worker(concurrency=8)
    scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean")
    clean_stack.stop_workers()
    clean_stack.redis_client().flushall()

    before = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--dry-run", "--json").stdout)
    assert before["to_judge"] == 120, "with the done-set gone, everything would be paid again"
    result = irlive("reindex", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"manifests": 3, "judged": 120, "restored": 120}
    client = clean_stack.redis_client()
    done = sum(client.hlen(k) for k in client.scan_iter("irlive:done:*", count=1000))
    assert done == 2 * 120, "content entries come back too: copies found later are still judged once"

    after = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--json").stdout)
    assert (after["found"], after["already_judged"], after["enqueued"]) == (120, 120, 0)
    assert clean_stack.sandbox_ledger()["calls_billed"] == 12, "the rescan paid nothing"
    again = json.loads(irlive("reindex", "--json").stdout)
    assert again["restored"] == 0, "reindexing twice changes nothing"
