"""End to end through the CLI on real Redis, moto_server, the sandbox and celery worker processes."""

from __future__ import annotations

import base64
import json
from collections import Counter
from typing import Any

import pytest

from sandbox import procs
from sandbox.images import Sample, demo_corpus, png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import (
    IN_BUCKET,
    OUT_BUCKET,
    OUT_PREFIX,
    SECRET_PATTERNS,
    X402_ENV,
    X402_SECRET,
    all_output_text,
    payment_tokens,
    read_run,
    upload,
    validator,
    wait_done,
)
from worker.judge.manifest import VERDICTS

pytestmark = pytest.mark.integration


def scan_and_wait(irlive: IrliveRunner, source: str, *extra: str, timeout: float = 180) -> str:
    scanned = irlive("scan", source, "--json", *extra)
    assert scanned.returncode == 0, scanned.stderr
    run_id: str = json.loads(scanned.stdout)["run_id"]
    wait_done(irlive, run_id, timeout)
    return run_id


def test_every_image_gets_one_record_matching_the_truth(clean_stack: Stack, irlive: IrliveRunner) -> None:
    corpus = demo_corpus(80, seed=11)
    upload(clean_stack, corpus)
    clean_stack.start_worker()
    clean_stack.start_worker()

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/captures"))

    keys = Counter(r["key"] for r in run.records)
    assert keys == Counter(s.key for s in corpus), "each object exactly one record"
    got = {r["key"]: r for r in run.records}
    wrong = [(s.key, s.expected, got[s.key]["verdict"]) for s in corpus if got[s.key]["verdict"] != s.expected]
    assert wrong == []
    assert not any(r.get("warning") for r in run.records), "256x256 captures meet the recommendation"
    for sample in corpus:
        if sample.expected == "rejected":
            assert got[sample.key]["reason"], sample.key
            assert got[sample.key]["error_code"], sample.key
    counts = Counter(r["verdict"] for r in run.records)
    assert run.manifest["counts"] == {v: counts.get(v, 0) for v in VERDICTS}
    assert run.manifest["failed"]["count"] == counts["rejected"] + counts["error"]
    assert len(run.failed_jsonl.splitlines()) == run.manifest["failed"]["count"]


def test_invalid_objects_cost_nothing_and_bills_match_calls(clean_stack: Stack, irlive: IrliveRunner) -> None:
    corpus = demo_corpus(40, seed=5)
    upload(clean_stack, corpus)
    clean_stack.start_worker()

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/captures"))

    ledger = clean_stack.sandbox_ledger()
    assert ledger["calls_billed"] == run.manifest["calls"]
    assert run.manifest["spend_cents"] == 20 * ledger["calls_billed"]
    billed_paths = ledger["billed_image_urls_path_counts"]
    invalid = [s.key for s in corpus if s.expected == "rejected"]
    assert invalid, "the corpus must contain invalid objects"
    for key in invalid:
        assert not any(path.endswith(key.split("/")[-1]) for path in billed_paths), key
    assert max(billed_paths.values()) == 1, "no image billed twice"
    assert ledger["token_uses"] <= 1
    assert ledger["images_billed"] == sum(1 for s in corpus if s.expected != "rejected")


def test_clean_images_take_one_call_per_ten(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = [Sample(f"clean/img_{i:04d}.png", png(128, 128, "live", seed=i), "live") for i in range(100)]
    upload(clean_stack, samples)
    clean_stack.start_worker()

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/clean"))

    assert run.manifest["counts"]["live"] == 100
    assert run.manifest["calls"] == 10
    assert all("256x256" in r["warning"] for r in run.records), "128x128 is judged but flagged"
    assert clean_stack.sandbox_ledger()["calls_billed"] == 10


def test_manifests_match_their_schemas(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, demo_corpus(30, seed=3))
    clean_stack.start_worker()

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/captures"))

    validator("run").validate(run.manifest)
    for chunk in run.chunks:
        validator("chunk").validate(chunk)
    record_schema = validator("record")
    for line in run.failed_jsonl.splitlines():
        record_schema.validate(json.loads(line))


def test_no_token_or_presigned_url_leaks(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, demo_corpus(30, seed=9))
    worker = clean_stack.start_worker(extra_env={"IRLIVE_API_KEY": "sk-live-do-not-print"})
    clean_stack.sandbox_config(api_key="sk-live-do-not-print")

    scan_and_wait(irlive, f"s3://{IN_BUCKET}/captures")

    tokens = payment_tokens(clean_stack)
    assert tokens, "the wallet must have recorded the tokens it bought"
    texts = {"output": all_output_text(clean_stack), "worker log": worker.log.read_text()}
    for name, text in texts.items():
        assert not SECRET_PATTERNS.search(text), name
        assert "sk-live-do-not-print" not in text, name
        for token in tokens:
            assert token not in text, f"a payment token appears in the {name}"


def test_broker_messages_carry_keys_only(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, demo_corpus(20, seed=2))

    scanned = irlive("scan", f"s3://{IN_BUCKET}/captures", "--json")
    assert scanned.returncode == 0, scanned.stderr

    queued = clean_stack.redis_client().lrange("irlive.nightly", 0, -1)
    assert queued, "chunks wait in the broker queue while no worker runs"
    for raw in queued:
        message = json.loads(raw)
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        (chunk,) = json.loads(body)[0]
        assert set(chunk) == {"run_id", "seq", "bucket", "items", "priority"}, "keys (and ETags) only"
        text = json.dumps(message) + body
        assert "http" not in text and "Signature" not in text and "token" not in text.lower()
        assert message["headers"]["task"] == "irlive.process_chunk"


def test_scan_of_missing_bucket_fails_clearly(clean_stack: Stack, irlive: IrliveRunner) -> None:
    result = irlive("scan", "s3://no-such-bucket-here/x")
    assert result.returncode == 2
    assert "no-such-bucket-here" in result.stderr and "does not exist" in result.stderr


def test_bad_setting_fails_at_start_naming_it(clean_stack: Stack, irlive: IrliveRunner) -> None:
    result = irlive("scan", f"s3://{IN_BUCKET}/x", env={"IRLIVE_IMAGES_PER_CALL": "11"})
    assert result.returncode == 2
    assert "IRLIVE_IMAGES_PER_CALL" in result.stderr


def test_empty_prefix_finishes_with_zero_images(clean_stack: Stack, irlive: IrliveRunner) -> None:
    clean_stack.start_worker()
    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/nothing-here"))
    assert run.manifest["images"] == 0 and run.manifest["calls"] == 0


def test_a_deployment_exposing_only_the_legacy_path(clean_stack: Stack, irlive: IrliveRunner) -> None:
    """Payments bought for the listing's id, calls POSTed to the legacy path (IRLIVE_TOOL_PATH); without the
    setting the run fails at once saying so, and buys nothing."""
    corpus = demo_corpus(20, seed=3)
    upload(clean_stack, corpus)
    clean_stack.sandbox_config(tool_paths="legacy")
    clean_stack.start_worker()
    scanned = irlive("scan", f"s3://{IN_BUCKET}/captures", "--json")
    assert scanned.returncode == 0, scanned.stderr
    failed_run = json.loads(scanned.stdout)["run_id"]
    waited = irlive("status", failed_run, "--wait", "--json", "--timeout", "60", timeout=90)
    status = json.loads(waited.stdout)
    assert status["state"] == "failed" and "IRLIVE_TOOL_PATH" in json.dumps(status), waited.stdout
    assert clean_stack.sandbox_ledger()["payments_created"] == 0
    clean_stack.stop_workers()

    env = {"IRLIVE_TOOL_PATH": "/api/tools/aliyun-facebody-detect-infrared-living-face"}
    clean_stack.start_worker(extra_env=env)
    smoke = irlive("smoke", f"s3://{IN_BUCKET}/{corpus[0].key}", "--json", env=env)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert json.loads(smoke.stdout)["verdict"] == corpus[0].expected, smoke.stdout
    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/captures"))
    got = {r["key"]: r["verdict"] for r in run.records}
    assert got == {s.key: s.expected for s in corpus}
    # The smoke test's call and the run's, all on the legacy path, none on the main one (it answers 404).
    assert clean_stack.sandbox_ledger()["calls_billed"] == 1 + run.manifest["calls"] > 1


def test_switching_the_listing_leaves_the_other_listing_s_pooled_tokens_unspent(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    """A fleet moved to another listing (IRLIVE_SERVICE_ID) never spends the tokens pooled for the first one, which
    the seller would refuse (they were voided before, $0.20 each); `irlive wallet` says where they wait, and the
    first listing spends them again once it is back (issue 22, item 11)."""
    upload(clean_stack, [Sample(f"first/img_{i:02d}.png", png(96, 96, "live", seed=800 + i), "live")
                         for i in range(20)])
    upload(clean_stack, [Sample(f"second/img_{i:02d}.png", png(96, 96, "live", seed=830 + i), "live")
                         for i in range(20)])

    def wallet(env: dict[str, str] | None = None) -> dict[str, Any]:
        shown = irlive("wallet", "--json", env=env)
        assert shown.returncode == 0, shown.stderr
        doc: dict[str, Any] = json.loads(shown.stdout)
        return doc

    clean_stack.start_worker()
    scan_and_wait(irlive, f"s3://{IN_BUCKET}/first")
    # The pool keeper tops the default listing's pool up while calls are made (IRLIVE_TOKEN_POOL_SIZE 2).
    procs.wait_until(lambda: wallet()["totals"]["pool"] >= 1, 30, "tokens pooled for the first listing")
    clean_stack.stop_workers()
    pooled = wallet()["totals"]["pool"]
    client = clean_stack.redis_client()
    kept = [pid.decode() for pid in client.lrange("irlive:wallet:pool", 0, -1)]
    assert len(kept) == pooled

    other = {"IRLIVE_SERVICE_ID": "aliyun-facebody-detect-infrared-living-face"}
    clean_stack.start_worker(extra_env=other)
    scan_and_wait(irlive, f"s3://{IN_BUCKET}/second")
    clean_stack.stop_workers()
    seen = wallet(other)
    assert seen["totals"].get("void", 0) == 0, "no token of the first listing was sent to the second"
    assert seen["other_pools"] == {"infrared-face-liveness-detection /api/tools/infrared-face-liveness-detection":
                                   pooled}, seen
    shown = irlive("wallet", env=other)
    assert f"other listings  {pooled} tokens kept for infrared-face-liveness-detection" in shown.stdout

    # Back on the first listing: the tokens kept for it are the first it spends.
    clean_stack.start_worker()
    again = scan_and_wait(irlive, f"s3://{IN_BUCKET}/first", "--force")
    clean_stack.stop_workers()
    body = clean_stack.s3_client().get_object(Bucket=OUT_BUCKET, Key=f"{OUT_PREFIX}/runs/{again}/payments.jsonl")
    spent = {p["payment_id"] for p in map(json.loads, body["Body"].read().decode().splitlines())
             if p["state"] == "spent"}
    assert set(kept) <= spent, (kept, spent)


def test_calls_through_the_marketplace_s_mcp_tool(clean_stack: Stack, irlive: IrliveRunner) -> None:
    """IRLIVE_PAYMENT_METHOD=mcp-token: tokens bought as for HTTP, every call a `tools/call` of the MCP tool with
    `paymentToken`; verdicts equal the truth, ten images a call, the bill equal to the manifest, no token out."""
    corpus = demo_corpus(60, seed=21)
    upload(clean_stack, corpus)
    env = {"IRLIVE_PAYMENT_METHOD": "mcp-token"}
    smoke = irlive("smoke", f"s3://{IN_BUCKET}/{corpus[0].key}", "--json", env=env)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert json.loads(smoke.stdout)["verdict"] == corpus[0].expected, smoke.stdout
    assert clean_stack.sandbox_ledger()["mcp_calls"] == 1, "irlive smoke calls through the configured method"
    clean_stack.start_worker(extra_env=env)
    clean_stack.start_worker(extra_env=env)

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/captures"))

    got = {r["key"]: r["verdict"] for r in run.records}
    assert got == {s.key: s.expected for s in corpus}
    ledger = clean_stack.sandbox_ledger()
    judged = sum(1 for s in corpus if s.expected != "rejected")
    # Besides the smoke test's one call of one image.
    assert ledger["mcp_calls"] - 1 == ledger["calls_billed"] - 1 == run.manifest["calls"] == -(-judged // 10)
    assert run.manifest["spend_cents"] == 20 * run.manifest["calls"]
    assert ledger["images_billed"] - 1 == judged
    tokens = payment_tokens(clean_stack)
    assert tokens, "the run paid with tokens"
    text = all_output_text(clean_stack) + "".join(p.read_text() for p in clean_stack.workdir.glob("w*.log"))
    assert not any(t in text for t in tokens)
    assert SECRET_PATTERNS.search(all_output_text(clean_stack)) is None


def test_calls_paid_by_x402_signatures(clean_stack: Stack, irlive: IrliveRunner) -> None:
    """IRLIVE_PAYMENT_METHOD=x402: no marketplace payment is bought, each call carries an authorization signed for
    it; verdicts equal the truth, ten images a call, irlive's ledger equal to the sandbox's settlements (payer,
    transaction, amount), and neither the key nor a signature anywhere in the output, the logs or Redis."""
    corpus = demo_corpus(60, seed=21)
    upload(clean_stack, corpus)
    smoke = irlive("smoke", f"s3://{IN_BUCKET}/{corpus[0].key}", "--json", env=X402_ENV)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    assert json.loads(smoke.stdout)["verdict"] == corpus[0].expected, smoke.stdout
    assert clean_stack.sandbox_ledger()["x402_settled"] == 1, "irlive smoke pays with one signature"
    smoked = json.loads(smoke.stdout)
    validator("smoke").validate(smoked)
    [first] = clean_stack.sandbox_ledger()["x402_settlements"]
    assert smoked["x402"]["transaction"] == first["transaction"] and smoked["x402"]["outcome"] == "settled"
    clean_stack.start_worker(extra_env=X402_ENV)
    clean_stack.start_worker(extra_env=X402_ENV)

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/captures"))

    got = {r["key"]: r["verdict"] for r in run.records}
    assert got == {s.key: s.expected for s in corpus}
    ledger = clean_stack.sandbox_ledger()
    judged = sum(1 for s in corpus if s.expected != "rejected")
    assert ledger["payments_created"] == 0, "no POST /api/payments on the x402 path"
    assert ledger["x402_settled"] - 1 == ledger["calls_billed"] - 1 == run.manifest["calls"] == -(-judged // 10)
    assert run.manifest["spend_cents"] == 20 * run.manifest["calls"]
    assert ledger["images_billed"] - 1 == judged
    settled = {s["transaction"]: s for s in ledger["x402_settlements"]}
    ours = x402_records(clean_stack, run.run_id)
    assert {r["x402_transaction"] for r in ours} == set(settled) - {smoke_transaction(clean_stack, settled)}
    for record in ours:
        seller = settled[record["x402_transaction"]]
        assert record["state"] == "spent" and record["x402_payer"] == seller["payer"]
        assert int(record["x402_amount"]) == int(seller["amount"]) == 20 * 10_000
    wallet = irlive("wallet", "--json", env=X402_ENV)
    shown = json.loads(wallet.stdout)
    validator("wallet").validate(shown)
    assert shown["x402"]["payer"] == ledger["x402_settlements"][0]["payer"]
    assert shown["x402"]["signed_today_cents"] == 20 * ledger["x402_settled"] and shown["x402"]["unsettled"] == 0
    text = "\n".join([all_output_text(clean_stack), smoke.stdout, smoke.stderr, wallet.stdout,
                      irlive("wallet", env=X402_ENV).stdout, irlive("config", env=X402_ENV).stdout,
                      *(p.read_text() for p in clean_stack.workdir.glob("w*.log")), redis_dump(clean_stack)])
    assert X402_SECRET.search(text) is None
    assert SECRET_PATTERNS.search(all_output_text(clean_stack)) is None


def x402_records(stack: Stack, run_id: str) -> list[dict[str, str]]:
    """The run's payments as irlive's ledger archived them (payments.jsonl) or still holds them in Redis."""
    found: dict[str, dict[str, str]] = {}
    r = stack.redis_client()
    for key in r.scan_iter("irlive:pay:x402_*"):
        record = {_text(k): _text(v) for k, v in r.hgetall(key).items()}
        if record.get("run_id") == run_id or record.get("state") == "spent":
            found[_text(key).rsplit(":", 1)[-1]] = record
    s3 = stack.s3_client()
    try:
        body = s3.get_object(Bucket="irlive-out", Key=f"results/runs/{run_id}/payments.jsonl")["Body"].read()
    except s3.exceptions.NoSuchKey:
        body = b""
    for line in body.decode().splitlines():
        record = json.loads(line)
        found[record["payment_id"]] = {k: str(v) for k, v in record.items()}
    return [r for r in found.values() if r.get("run_id") == run_id]


def smoke_transaction(stack: Stack, settled: dict[str, dict[str, str]]) -> str:
    """The smoke test's one settlement (the first the sandbox made)."""
    return min(settled.values(), key=lambda s: s["settledAt"])["transaction"]


def redis_dump(stack: Stack) -> str:
    """Every string and hash value in Redis, for leak checks."""
    r = stack.redis_client()
    texts = []
    for key in r.scan_iter("*"):
        kind = _text(r.type(key))
        if kind == "string":
            texts.append(_text(r.get(key)))
        elif kind == "hash":
            texts.extend(f"{_text(k)}={_text(v)}" for k, v in r.hgetall(key).items())
        elif kind == "list":
            texts.extend(_text(v) for v in r.lrange(key, 0, -1))
    return "\n".join(texts)


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
