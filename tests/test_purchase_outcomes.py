"""Purchases whose outcome is not known, and tokens above the price cap, through the real stack from the CLI:
charged and counted, never past a cap, never repeated without end, never spent without a person's say."""

from __future__ import annotations

import json
import subprocess

import pytest

from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run, upload
from tests.faults import check_invariants, drive_to_completion
from tests.test_budget import clean_samples, poll, run_hash
from worker.keys import Keys

pytestmark = pytest.mark.slow


def _run_id(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    run_id: str = json.loads(done.stdout)["run_id"]
    return run_id


@pytest.mark.parametrize("answer", ["renamed_token", "empty", "nested", "server_error", "hang"])
def test_a_purchase_without_a_usable_answer_is_charged_counted_and_pauses_the_run(
        clean_stack: Stack, irlive: IrliveRunner, answer: str) -> None:
    samples = clean_samples(60, f"buy-{answer}")
    upload(clean_stack, samples)
    # The seller creates (and charges) every payment, then answers as `answer` says.
    clean_stack.sandbox_config(payment_answer=answer, timeout_sleep_s=60)
    # `hang` only: the worker gives up reading after 2 s instead of the shipped 30 s, to keep the test short; what
    # it does after giving up is the same.
    env = {"IRLIVE_CALL_TIMEOUT_S": "2"} if answer == "hang" else {}
    clean_stack.start_worker(extra_env=env, concurrency=1)
    run_id = _run_id(irlive("scan", f"s3://{IN_BUCKET}/buy-{answer}", "--budget", "1.00", "--json"))
    waited = json.loads(irlive("status", run_id, "--wait", "--json", "--timeout", "120", timeout=150).stdout)
    assert waited["state"] == "paused", waited

    run = run_hash(clean_stack, run_id)
    seller = clean_stack.sandbox_ledger()
    wallet = json.loads(irlive("wallet", "--json").stdout)["totals"]
    print(f"run {run}\nseller {seller}\nwallet {wallet}")
    assert "no usable token" in run["pause_reason"] and "irlive resume" in run["pause_reason"]
    # Three purchases for the run, each charged to it and to the day; none repeated past the third.
    assert int(run["unknown_purchases"]) == 3 and int(run["committed_cents"]) == 60 <= 100
    # Every payment the seller charged is in the ledger as unknown (the pool keeper's included), and the day
    # is charged for each: nothing charged is written down as never made.
    assert seller["payments_created"] == wallet["unknown_purchases"] >= 3
    assert wallet["spent_today_cents"] == 20 * seller["payments_created"]
    assert wallet.get("bought", 0) == 0 and seller["calls_billed"] == 0
    # The pool keeper stops too: no more purchases once three in a row brought nothing.
    assert wallet["unknown_in_row"] >= 3
    # No answer's content reaches the reason (it may hold the token): only its shape.
    assert "tok_" not in run["pause_reason"]

    # A person looks, the seller is mended, the run goes on with a bigger budget and ends with every image.
    clean_stack.sandbox_config(payment_answer="normal")
    resumed = irlive("resume", run_id, "--budget", "3.00", "--json")
    assert resumed.returncode == 0, resumed.stderr
    drive_to_completion(clean_stack, run_id, deadline_s=120)
    assert check_invariants(clean_stack, run_id, samples, strict_once=True) == []
    manifest = read_run(clean_stack, run_id).manifest
    assert manifest["unknown_purchases"] == 3 and manifest["unknown_purchase_cents"] == 60
    assert int(run_hash(clean_stack, run_id)["committed_cents"]) <= 300


def test_a_token_bought_above_the_price_cap_is_held_and_never_spent_without_a_release(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    # Twenty calls: more than the first chunk's five (sent together) and the pool keeper's two can pay, whatever
    # the timing.
    upload(clean_stack, clean_samples(200, "dear"))
    # The seller raises its price after the worker read the quote (kept 5 minutes): the next purchase costs 30.
    clean_stack.sandbox_config(latency_ms=1500)
    clean_stack.start_worker(concurrency=1)
    first = _run_id(irlive("scan", f"s3://{IN_BUCKET}/dear", "--json"))
    poll(lambda: clean_stack.sandbox_ledger()["payments_created"] >= 1, 60, "the first purchase")
    clean_stack.sandbox_config(price_cents=30, latency_ms=0)
    waited = json.loads(irlive("status", first, "--wait", "--json", "--timeout", "120", timeout=150).stdout)
    print(waited)
    assert waited["state"] == "failed" and "IRLIVE_MAX_PRICE_CENTS" in (waited["error"] or "")
    held = json.loads(irlive("wallet", "--json").stdout)["totals"]["held"]
    assert held >= 1, "the token bought at 30 cents is held"
    client = clean_stack.redis_client()
    dear = [pid.decode() for pid in client.lrange(Keys().held(), 0, -1)]
    assert all(client.hget(Keys().payment(p), "state") == b"held" for p in dear)

    # Back at 20 cents, a second run never touches the held token: every call it pays costs 20.
    clean_stack.sandbox_config(price_cents=20)
    upload(clean_stack, clean_samples(20, "cheap"))
    second = _run_id(irlive("scan", f"s3://{IN_BUCKET}/cheap", "--json"))
    drive_to_completion(clean_stack, second, deadline_s=120)
    run = run_hash(clean_stack, second)
    assert int(run["spend_cents"]) == 20 * int(run["calls"])
    assert all(client.hget(Keys().payment(p), "state") == b"held" for p in dear)

    # The person's say: released into the pool (a worker with a lower cap would hold it again).
    released = json.loads(irlive("wallet", "--release-held", "--json").stdout)
    assert released["released_now"] == len(dear) and released["totals"]["held"] == 0
    assert all(client.hget(Keys().payment(p), "state") == b"paid" for p in dear)
