"""Spend control on the real stack: budget caps under racing workers, resume, dry run, price guard, dedupe."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from sandbox.images import Sample, png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, X402_ENV, read_run, upload
from tests.test_e2e import scan_and_wait

pytestmark = pytest.mark.integration


def clean_samples(n: int, prefix: str = "clean") -> list[Sample]:
    return [Sample(f"{prefix}/img_{i:05d}.png", png(96, 96, "live", seed=i), "live") for i in range(n)]


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def run_hash(stack: Stack, run_id: str) -> dict[str, str]:
    raw = stack.redis_client().hgetall(f"irlive:run:{run_id}")
    return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


def settled(stack: Stack, run_id: str) -> bool:
    """Every chunk of the run is either complete or parked, and no token is out."""
    r = stack.redis_client()
    run = run_hash(stack, run_id)
    done = r.scard(f"irlive:run:{run_id}:chunks-done")
    parked = r.llen(f"irlive:run:{run_id}:parked")
    return done + parked == int(run["chunks"]) and r.zcard("irlive:wallet:leases") == 0


METHOD_ENV = {"token": {}, "mcp-token": {"IRLIVE_PAYMENT_METHOD": "mcp-token"}, "x402": X402_ENV}


@pytest.mark.parametrize("method", ["token", "mcp-token", "x402"])
def test_budget_of_n_calls_bills_exactly_n_with_8_workers_then_resume_completes(
        clean_stack: Stack, irlive: IrliveRunner, method: str) -> None:
    upload(clean_stack, clean_samples(200))
    for _ in range(8):
        clean_stack.start_worker(concurrency=4, extra_env={**METHOD_ENV[method],
                                                           "IRLIVE_PAYMENT_METHOD": method})

    scanned = irlive("scan", f"s3://{IN_BUCKET}/clean", "--budget", "1.40", "--json")
    assert scanned.returncode == 0, scanned.stderr
    run_id = json.loads(scanned.stdout)["run_id"]
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "120", timeout=150)
    assert waited.returncode == 3, waited.stdout + waited.stderr
    assert json.loads(waited.stdout)["state"] == "paused_budget"
    poll(lambda: settled(clean_stack, run_id), 60, "every chunk complete or parked")

    assert clean_stack.sandbox_ledger()["calls_billed"] == 7
    run = run_hash(clean_stack, run_id)
    assert (int(run["calls"]), int(run["spend_cents"])) == (7, 140)
    status = irlive("status", run_id)
    assert "budget" in status.stdout and "paused_budget" in status.stdout

    resumed = irlive("resume", run_id, "--budget", "100", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["chunks_resent"] >= 1
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "120", timeout=150)
    assert json.loads(waited.stdout)["state"] == "done", waited.stdout

    output = read_run(clean_stack, run_id)
    assert sorted(r["key"] for r in output.records) == sorted(s.key for s in clean_samples(200))
    ledger = clean_stack.sandbox_ledger()
    assert max(ledger["billed_image_urls_path_counts"].values()) == 1
    assert ledger["images_billed"] == 200
    assert ledger["calls_billed"] == output.manifest["calls"] == 20
    assert (ledger["mcp_calls"] >= 20) if method == "mcp-token" else ledger["mcp_calls"] == 0
    assert (ledger["x402_settled"] == 20 and ledger["payments_created"] == 0) if method == "x402" else (
        ledger["x402_settled"] == 0)


def test_daily_cap_stops_purchases(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(60))
    clean_stack.start_worker(extra_env={"IRLIVE_DAILY_BUDGET_USD": "0.60", "IRLIVE_TOKEN_POOL_SIZE": "2"})

    scanned = irlive("scan", f"s3://{IN_BUCKET}/clean", "--json")
    run_id = json.loads(scanned.stdout)["run_id"]
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "60", timeout=90)

    assert json.loads(waited.stdout)["state"] == "paused_budget"
    assert "daily budget" in json.loads(waited.stdout)["error"]
    poll(lambda: settled(clean_stack, run_id), 30, "chunks parked")
    assert clean_stack.sandbox_ledger()["payments_created"] == 3


def test_dry_run_estimate_equals_actual_spend_and_cost_per_image(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = clean_samples(300)
    upload(clean_stack, samples)

    dry = irlive("scan", f"s3://{IN_BUCKET}/clean", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    estimate = json.loads(dry.stdout)
    assert (estimate["found"], estimate["to_judge"], estimate["calls"]) == (300, 300, 30)
    assert estimate["price_source"] == "quoted by the marketplace"
    ledger = clean_stack.sandbox_ledger()
    assert ledger["payments_created"] == ledger["calls_billed"] == 0, "a dry run spends nothing (the 402 quote is free)"
    assert clean_stack.redis_client().llen("irlive.nightly") == 0, "a dry run enqueues nothing"

    clean_stack.start_worker(concurrency=16)
    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean"))

    assert run.manifest["spend_cents"] == estimate["cost_cents"]
    assert run.manifest["spend_cents"] / 100 / 300 <= 0.0201

    again = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--dry-run", "--json").stdout)
    assert (again["already_judged"], again["to_judge"], again["cost_cents"]) == (300, 0, 0)


def test_confirm_above_refuses_without_a_terminal(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(30))
    result = irlive("scan", f"s3://{IN_BUCKET}/clean", "--confirm-above", "0.10")
    assert result.returncode == 2
    assert "above --confirm-above" in result.stderr
    assert clean_stack.redis_client().llen("irlive.nightly") == 0


@pytest.mark.parametrize("method", ["token", "x402"])
def test_price_above_the_maximum_stops_the_run_before_paying(clean_stack: Stack, irlive: IrliveRunner,
                                                             method: str) -> None:
    upload(clean_stack, clean_samples(20))
    clean_stack.sandbox_config(price_cents=25)
    clean_stack.start_worker(extra_env=METHOD_ENV[method])

    scanned = irlive("scan", f"s3://{IN_BUCKET}/clean", "--json")
    run_id = json.loads(scanned.stdout)["run_id"]
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "60", timeout=90)

    status = json.loads(waited.stdout)
    assert status["state"] == "failed"
    assert "25 cents" in status["error"] and "IRLIVE_MAX_PRICE_CENTS" in status["error"]
    ledger = clean_stack.sandbox_ledger()
    assert ledger["payments_created"] == ledger["x402_settled"] == ledger["x402_refused"] == 0, "nothing signed"


def test_rescan_skips_judged_images_and_judges_changed_ones(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = clean_samples(25)
    upload(clean_stack, samples)
    clean_stack.start_worker()
    scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean")
    clean_stack.s3_client().put_object(Bucket=IN_BUCKET, Key=samples[3].key, Body=png(96, 96, "spoof", seed=999))

    second = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--json").stdout)
    assert (second["found"], second["already_judged"], second["enqueued"]) == (25, 24, 1)
    forced = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--force", "--json").stdout)
    assert forced["enqueued"] == 25


def test_wallet_ledger_equals_the_sandbox(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(45))
    clean_stack.start_worker(extra_env={"IRLIVE_TOKEN_POOL_SIZE": "3"})
    scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean")
    clean_stack.stop_workers()

    wallet = json.loads(irlive("wallet", "--json").stdout)["totals"]
    ledger = clean_stack.sandbox_ledger()
    assert wallet["bought"] == ledger["payments_created"]
    assert wallet["spent"] == ledger["tokens_consumed"] - ledger["tokens_restored"] == ledger["calls_billed"]
    assert wallet["pool"] == wallet["bought"] - wallet["spent"] - wallet.get("void", 0)
    human = irlive("wallet")
    assert "prepaid tokens waiting" in human.stdout
