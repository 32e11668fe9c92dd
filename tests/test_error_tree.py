"""Each branch of the error tree, through the sandbox's fault knobs, on the real stack."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from sandbox.images import Sample, png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run, upload
from tests.test_budget import clean_samples
from tests.test_e2e import scan_and_wait

pytestmark = pytest.mark.integration


def billed(stack: Stack) -> Counter[str]:
    counts = stack.sandbox_ledger()["billed_image_urls_path_counts"]
    return Counter({path.rsplit("/", 1)[-1]: n for path, n in counts.items()})


@pytest.mark.parametrize("style", ["429", "400"])
def test_throttling_is_waited_out_not_counted_and_not_billed(
        clean_stack: Stack, irlive: IrliveRunner, style: str) -> None:
    upload(clean_stack, clean_samples(100))
    clean_stack.sandbox_config(rate_limit_per_s=4, throttle_style=style)
    clean_stack.start_worker(extra_env={"IRLIVE_RATE_LIMIT_PER_S": "40"}, concurrency=8)

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean"))

    ledger = clean_stack.sandbox_ledger()
    assert ledger["throttled"] > 0, "the seller must have throttled us for this test to mean anything"
    assert run.manifest["counts"]["live"] == 100
    assert all(r["attempts"] == 1 for r in run.records), "throttling does not use up attempts"
    assert ledger["calls_billed"] == run.manifest["calls"] == 10
    assert ledger["token_uses"] <= 1
    state = clean_stack.redis_client().hgetall("irlive:ratelimit:state")
    assert float(state[b"rate"]) < 40, "the shared rate came down"


def test_transient_5xx_is_retried_with_backoff_and_every_paid_attempt_is_counted(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(60))
    clean_stack.sandbox_config(p_5xx=0.3, seed=4)
    clean_stack.start_worker(extra_env={"IRLIVE_MAX_ATTEMPTS": "8"})

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean"))

    ledger = clean_stack.sandbox_ledger()
    assert ledger["errors_5xx"] > 0
    assert run.manifest["counts"]["live"] == 60
    assert ledger["calls_billed"] == run.manifest["calls"] == 6 + ledger["errors_5xx"]
    assert max(r["attempts"] for r in run.records) > 1


def test_a_bad_image_the_seller_refuses_is_found_by_splitting_and_recorded_not_retried(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = clean_samples(10)
    bad = Sample("clean/img_00003.png", png(96, 96, "undecodable", seed=3), "error")
    upload(clean_stack, [*samples[:3], bad, *samples[4:]])
    clean_stack.start_worker()

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean"))

    got = {r["key"]: r for r in run.records}
    assert got[bad.key]["verdict"] == "error" and got[bad.key]["error_code"] == "InvalidImage.Decode"
    assert all(got[s.key]["verdict"] == "live" for s in samples if s.key != bad.key)
    # 1 refused batch of 10, then halves: [5 with the bad one] refused, [5] judged, then 2|3, ... each counted.
    ledger = clean_stack.sandbox_ledger()
    assert ledger["calls_billed"] == run.manifest["calls"]
    assert 3 <= run.manifest["calls"] <= 1 + 2 * 4, "a bisection, not one call per image"
    # Every refused call held the bad image; it was never sent once it stood alone and was refused.
    refused_calls = run.manifest["calls"] - len({r["request_id"] for r in run.records if r["verdict"] == "live"})
    assert billed(clean_stack)["img_00003.png"] == refused_calls


def test_a_wrong_api_key_stops_the_run_naming_the_setting_and_pays_nothing(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(10))
    clean_stack.sandbox_config(api_key="the-right-key")
    clean_stack.start_worker(extra_env={"IRLIVE_API_KEY": "a-wrong-key"})

    scanned = irlive("scan", f"s3://{IN_BUCKET}/clean", "--json")
    run_id = json.loads(scanned.stdout)["run_id"]
    status = json.loads(irlive("status", run_id, "--wait", "--json", "--timeout", "60", timeout=90).stdout)

    assert status["state"] == "failed"
    assert "IRLIVE_API_KEY" in status["error"]
    assert "a-wrong-key" not in status["error"]
    assert clean_stack.sandbox_ledger()["payments_created"] == 0


def test_an_unknown_outcome_is_reconciled_before_paying_again(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(60))
    clean_stack.sandbox_config(p_timeout=0.5, timeout_sleep_s=3, seed=11)
    clean_stack.start_worker(extra_env={"IRLIVE_CALL_TIMEOUT_S": "1", "IRLIVE_MAX_ATTEMPTS": "8"})

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean"))
    clean_stack.stop_workers()

    ledger = clean_stack.sandbox_ledger()
    assert ledger["timeouts"] > 0
    assert run.manifest["counts"]["live"] == 60
    assert ledger["token_uses"] <= 1, "a token whose answer was lost is never sent again"
    wallet = json.loads(irlive("wallet", "--reconcile", "--all", "--json").stdout)["totals"]
    assert wallet["bought"] == ledger["payments_created"]
    assert wallet["spent"] == ledger["tokens_consumed"] - ledger["tokens_restored"]
    assert wallet.get("reconciled_spent", 0) >= ledger["timeouts"]


def test_an_unknown_outcome_is_reconciled_with_the_shipped_call_timeout(clean_stack: Stack,
                                                                         irlive: IrliveRunner) -> None:
    # The test above shortens IRLIVE_CALL_TIMEOUT_S to see many timeouts; this one proves the same recovery
    # with the shipped 30 s: the seller takes the token and hangs past it once.
    upload(clean_stack, clean_samples(10))
    clean_stack.sandbox_config(p_timeout=1.0, timeout_sleep_s=40)
    clean_stack.start_worker()
    run_id = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--json").stdout)["run_id"]
    deadline = time.monotonic() + 60
    while clean_stack.sandbox_ledger()["timeouts"] < 1:
        assert time.monotonic() < deadline, "the first call never reached the seller"
        time.sleep(0.2)
    clean_stack.sandbox_config(p_timeout=0.0)  # only that first call hangs

    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "120", timeout=150)
    assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "done", waited.stdout
    run = read_run(clean_stack, run_id)
    ledger = clean_stack.sandbox_ledger()
    assert run.manifest["counts"]["live"] == 10 and run.manifest["answers_lost"] == 1
    assert ledger["timeouts"] == 1 and ledger["tokens_consumed"] == run.manifest["calls"] == 2
    assert ledger["token_uses"] <= 1, "the token whose answer was lost is never sent again"


def test_smoke_makes_exactly_one_paid_call_and_reports_it(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, [Sample("one/live.png", png(96, 96, "spoof", seed=1), "spoof")])

    result = irlive("smoke", f"s3://{IN_BUCKET}/one/live.png")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"] == "spoof" and report["quote_cents"] == 20
    assert report["answer"]["result_type"] == "string"
    assert report["payment_after"]["remaining_calls"] == 0
    ledger = clean_stack.sandbox_ledger()
    assert (ledger["payments_created"], ledger["calls_billed"]) == (1, 1)
    assert "X-Amz-Signature" not in result.stdout
