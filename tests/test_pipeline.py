"""One chunk through the pipeline over in-process stand-ins (tests/stubs.py): every branch of the error tree, the
ledger protocol and the claims, in milliseconds. The same paths run on real processes elsewhere."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sandbox.images import png
from tests.stubs import Harness, etag_of, harness
from worker.config import Settings
from worker.errors import BudgetExhausted, ChunkBusy, ConfigError, RateLimited, TransientError
from worker.flow import finalize, pipeline
from worker.flow.finalize import finalize_run
from worker.flow.leases import ChunkLease, Lease
from worker.flow.pipeline import ChunkProcessor, ClaimsHeld
from worker.judge.manifest import content_key
from worker.keys import Keys
from worker.messages import Chunk
from worker.seams.store import script_sha

BUCKET = "in-bucket"
OUTPUT = "s3://out-bucket/results"


def settings(**changes: Any) -> Settings:
    base: dict[str, Any] = {"token_pool_size": 0, "rate_limit_per_s": 1000.0, "max_in_flight": 0, "max_attempts": 3}
    return Settings(**{**base, **changes})


def chunk_of(h: Harness, n: int, run_id: str = "run-a", prefix: str = "img", budget_cents: int | None = None,
             force: bool = False, bad: tuple[int, ...] = ()) -> Chunk:
    items = []
    for i in range(n):
        data = b"not an image at all" if i in bad else png(96, 96, "live", seed=i)
        items.append((f"{prefix}/{i:03d}.png", h.storage.put(BUCKET, f"{prefix}/{i:03d}.png", data)))
    if h.deps.runs.get(run_id) is None:
        h.deps.runs.create(run_id, source=f"s3://{BUCKET}/{prefix}", output=OUTPUT,
                           settings={"force": force}, budget_cents=budget_cents)
        h.deps.runs.listing_finished(run_id)
    seq = h.deps.runs.add_chunk(run_id, items)
    return Chunk(run_id, seq, BUCKET, items)


def records(h: Harness, chunk: Chunk) -> list[dict[str, Any]]:
    doc, _ = h.storage.get_json("out-bucket", f"results/runs/{chunk.run_id}/chunks/{chunk.seq:06d}.json")
    return list(doc["images"])


def verdicts(h: Harness, chunk: Chunk) -> Counter[str]:
    return Counter(r["verdict"] for r in records(h, chunk))


def run_hash(h: Harness, run_id: str) -> dict[str, str]:
    return dict(h.redis.hgetall(f"irlive:run:{run_id}"))


def totals(h: Harness) -> dict[str, int]:
    return {"spent": 0, "void": 0, "bought": 0, **h.deps.ledger.totals()}


def test_a_clean_chunk_pays_one_call_per_ten_images_and_records_every_image() -> None:
    h = harness(settings())
    chunk = chunk_of(h, 25)
    assert ChunkProcessor(h.deps).run(chunk) == 0
    assert verdicts(h, chunk) == Counter({"live": 25})
    assert sorted(len(c) for c in h.seller.calls) == [5, 10, 10]
    assert (totals(h)["spent"], run_hash(h, "run-a")["calls"], run_hash(h, "run-a")["spend_cents"]) == (3, "3", "60")
    assert h.redis.keys("irlive:claim:*") == [], "every claim released with its record"
    assert totals(h)["unrecorded_answers"] == 0 and totals(h)["in_flight"] == 0


def test_a_chunk_sends_its_calls_together_while_the_limiter_admits_them_at_once() -> None:
    # The harness's limiter has room (1,000 calls/s, no in-flight cap): every call is admitted promptly, so the
    # chunk's five calls are in flight together. The seller holds each call until five are in (or 10 s: then a
    # chunk sending one call at a time shows a most of 1).
    h = harness(settings())
    books = threading.Condition()
    in_flight, most = [0], [0]

    def hold(keys: list[str]) -> None:
        with books:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            books.notify_all()
            books.wait_for(lambda: most[0] >= 5, timeout=10)
            in_flight[0] -= 1

    h.seller.on_call = hold
    chunk = chunk_of(h, 50)
    ChunkProcessor(h.deps).run(chunk)
    assert most[0] == 5
    assert verdicts(h, chunk) == Counter({"live": 50})
    assert sorted(len(c) for c in h.seller.calls) == [10] * 5 and totals(h)["spent"] == 5
    assert totals(h)["unrecorded_answers"] == 0 and totals(h)["in_flight"] == 0


def test_a_failure_in_one_of_a_chunks_calls_ends_its_others_and_is_raised_once_they_end() -> None:
    # Five calls together; the first to reach the seller is told the API key is wrong (the run stops), the others
    # are answered: every answer bought is recorded before the failure goes up, and nothing is paid twice.
    h = harness(settings())
    h.seller.script.append("401")
    chunk = chunk_of(h, 50)
    with pytest.raises(ConfigError):
        ChunkProcessor(h.deps).run(chunk)
    paid = totals(h)["spent"]
    assert len(records_in_progress(h, chunk)) == 10 * paid
    assert sum(h.seller.billed.values()) == 10 * paid and max(h.seller.billed.values(), default=1) == 1
    assert totals(h)["unrecorded_answers"] == 0 and totals(h)["in_flight"] == 0


def records_in_progress(h: Harness, chunk: Chunk) -> dict[str, str]:
    return dict(h.redis.hgetall(Keys().chunk_progress(chunk.run_id, chunk.seq)))


def test_images_that_fail_validation_are_rejected_and_never_paid_for() -> None:
    h = harness(settings())
    chunk = chunk_of(h, 12, bad=(0, 5))
    ChunkProcessor(h.deps).run(chunk)
    assert verdicts(h, chunk) == Counter({"live": 10, "rejected": 2})
    assert sum(h.seller.billed.values()) == 10 and len(h.seller.calls) == 1


def test_throttling_waits_without_using_an_attempt_and_gives_the_token_back() -> None:
    h = harness(settings(max_attempts=1))
    h.seller.script.extend(["429", "429"])
    chunk = chunk_of(h, 10)
    ChunkProcessor(h.deps).run(chunk)
    assert verdicts(h, chunk) == Counter({"live": 10})
    assert totals(h)["spent"] == 1 and totals(h)["bought"] == 1, "the throttled token was reused, not wasted"
    assert all(r["attempts"] == 1 for r in records(h, chunk))


def test_a_5xx_that_consumed_the_token_is_a_paid_attempt_and_is_retried() -> None:
    h = harness(settings())
    h.seller.script.append("503")
    chunk = chunk_of(h, 10)
    ChunkProcessor(h.deps).run(chunk)
    assert verdicts(h, chunk) == Counter({"live": 10})
    assert totals(h)["spent"] == 2 and run_hash(h, "run-a")["calls"] == "2"
    assert all(r["attempts"] == 2 for r in records(h, chunk))
    assert h.sleeps, "the retry backed off"


def test_transient_failures_until_the_attempts_run_out_end_in_error_records() -> None:
    h = harness(settings(max_attempts=3))
    h.seller.script.extend(["503"] * 3)
    chunk = chunk_of(h, 4)
    ChunkProcessor(h.deps).run(chunk)
    assert verdicts(h, chunk) == Counter({"error": 4})
    assert all(r["attempts"] == 3 and r["error_code"] == "TransientError" for r in records(h, chunk))
    assert totals(h)["spent"] == 3


def test_a_batch_refused_for_one_image_is_halved_until_that_image_is_found() -> None:
    h = harness(settings())
    h.seller.bad_keys.add("img/003.png")
    chunk = chunk_of(h, 8)
    ChunkProcessor(h.deps).run(chunk)
    got = {r["key"]: r for r in records(h, chunk)}
    assert got["img/003.png"]["verdict"] == "error" and got["img/003.png"]["error_code"] == "InvalidImage.Download"
    assert Counter(r["verdict"] for r in got.values()) == Counter({"live": 7, "error": 1})


def test_a_batch_the_seller_could_not_download_is_sent_once_more_whole_before_it_is_split() -> None:
    h = harness(settings())
    h.seller.script.extend(["download_refused"])
    chunk = chunk_of(h, 8)
    ChunkProcessor(h.deps).run(chunk)
    # The storage's blip passed: one extra call, not the eight-image bisection (2 x 8 - 1 calls).
    assert [len(keys) for keys in h.seller.calls] == [8, 8]
    assert verdicts(h, chunk) == Counter({"live": 8})


def test_a_batch_refused_for_a_download_twice_is_split_and_its_halves_are_not_retried_whole_again() -> None:
    h = harness(settings())
    h.seller.script.extend(["download_refused", "download_refused", "download_refused"])
    chunk = chunk_of(h, 8)
    ChunkProcessor(h.deps).run(chunk)
    # 8 refused, 8 again refused, split: the first half refused is halved at once (no second retry), then ok.
    assert [len(keys) for keys in h.seller.calls] == [8, 8, 4, 2, 2, 4]
    assert verdicts(h, chunk) == Counter({"live": 8})


def test_a_refused_token_is_void_and_another_is_bought() -> None:
    h = harness(settings())
    h.seller.script.append("402")
    chunk = chunk_of(h, 10)
    ChunkProcessor(h.deps).run(chunk)
    assert verdicts(h, chunk) == Counter({"live": 10})
    assert (totals(h)["void"], totals(h)["spent"], totals(h)["bought"]) == (1, 1, 2)


def test_a_timeout_after_the_seller_took_the_token_is_reconciled_as_an_answer_lost() -> None:
    h = harness(settings())
    h.seller.script.append("timeout")
    chunk = chunk_of(h, 10)
    ChunkProcessor(h.deps).run(chunk)
    assert verdicts(h, chunk) == Counter({"live": 10})
    run = run_hash(h, "run-a")
    assert (run["calls"], run["answers_lost"], run["answers_lost_images"]) == ("2", "1", "10")
    assert h.seller.billed == Counter({f"img/{i:03d}.png": 2 for i in range(10)})


def test_wrong_credentials_stop_the_run_and_the_token_goes_back() -> None:
    h = harness(settings())
    h.seller.script.append("401")
    chunk = chunk_of(h, 10)
    with pytest.raises(ConfigError, match="IRLIVE_API_KEY"):
        ChunkProcessor(h.deps).run(chunk)
    assert totals(h)["spent"] == 0 and totals(h)["pool"] == 1, "unused by the seller: back to the pool"


@pytest.mark.parametrize("behaviour", ["garbage", "nested"])
def test_an_answer_that_cannot_be_read_is_recorded_as_error_and_never_paid_again(behaviour: str) -> None:
    h = harness(settings())
    h.seller.script.append(behaviour)
    chunk = chunk_of(h, 10)
    ChunkProcessor(h.deps).run(chunk)
    if behaviour == "garbage":
        # Not JSON at all: a seller fault, paid for and retried like a 5xx.
        assert verdicts(h, chunk) == Counter({"live": 10}) and totals(h)["spent"] == 2
    else:
        assert verdicts(h, chunk) == Counter({"error": 10}) and totals(h)["spent"] == 1
        assert {r["error_code"] for r in records(h, chunk)} == {"unreadable_answer"}
        pid = next(iter(h.seller.payments))
        assert h.redis.hget(f"irlive:pay:{pid}", "answer"), "the raw answer is kept for a person to read"


def test_an_answer_missing_an_image_pays_again_for_that_image_only() -> None:
    h = harness(settings())
    h.seller.script.append("missing_last")
    chunk = chunk_of(h, 10)
    ChunkProcessor(h.deps).run(chunk)
    assert verdicts(h, chunk) == Counter({"live": 10})
    assert [len(c) for c in h.seller.calls] == [10, 1]


def test_a_run_budget_stops_before_paying_past_it() -> None:
    h = harness(settings())
    chunk = chunk_of(h, 30, budget_cents=40)
    with pytest.raises(BudgetExhausted, match=r"run budget of \$0\.40"):
        ChunkProcessor(h.deps).run(chunk)
    assert len(h.seller.calls) == 2 and totals(h)["bought"] == 2
    assert h.redis.keys("irlive:claim:*") == [], "the paused delivery's claims went with its lease"


def test_an_image_another_run_judged_is_recorded_from_that_judgment_for_free() -> None:
    h = harness(settings())
    first = chunk_of(h, 10, run_id="run-a")
    ChunkProcessor(h.deps).run(first)
    second = chunk_of(h, 10, run_id="run-b")
    ChunkProcessor(h.deps).run(second)
    assert len(h.seller.calls) == 1
    got = records(h, second)
    assert all(r["duplicate_of"] == {"run_id": "run-a", "seq": 0} and r["verdict"] == "live" for r in got)
    assert all(r["request_id"] == "req-1" and r["attempts"] == 0 for r in got)
    assert run_hash(h, "run-b").get("duplicates") == "10" and "calls" in run_hash(h, "run-b")


def test_an_image_whose_content_key_follows_from_its_etag_is_held_by_that_claim_alone() -> None:
    # An MD5 ETag's content key is computed by every delivery of that identity: its claim stands for both. A
    # multipart upload's (a hash of bytes read, which a delivery whose read failed lacks) keeps both claims.
    h = harness(settings())
    single, multipart = "in-bucket/a.png@" + "a" * 32, "in-bucket/b.png@" + "c" * 32 + "-2"
    contents = ["md5:" + "a" * 32 + ":10", "sha256:" + "f" * 64 + ":10"]
    h.deps.runs.create("run-a", source=f"s3://{BUCKET}/x", output=OUTPUT, settings={})
    with ChunkLease(h.deps.store, Keys(), "run-a", 0) as lease:
        got = h.deps.claims.claim(lease, "run-a", 0, [single, multipart], 0, contents)
        assert got.mine == [0, 1]
        held = sorted(h.redis.keys("irlive:claim:*"))
    assert held == sorted(f"irlive:claim:{k}" for k in (contents[0], multipart, contents[1]))
    assert h.redis.keys("irlive:claim:*") == [], "released with the lease"


def test_an_image_another_live_delivery_holds_is_waited_for_then_the_chunk_defers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "CLAIM_WAIT_S", 0.0)
    h = harness(settings())
    chunk = chunk_of(h, 3)
    other = Lease(h.deps.store, "irlive:lease:chunk:run-z:0", 60, token="elsewhere/1/abc")
    assert other.take()
    # The claim that delivery took: its content's (the content key follows from the ETag and size).
    identity = "in-bucket/img/001.png@" + chunk.items[1][1]
    info, _ = h.storage.read_head(BUCKET, "img/001.png", 1)
    (key,) = Keys().claim_keys(identity, content_key(info.etag, info.size))
    h.redis.set(key, f"elsewhere/1/abc run-z 0 {Keys().done(identity).field}", px=60_000)
    with pytest.raises(ClaimsHeld, match="run-z/0"):
        ChunkProcessor(h.deps).run(chunk)
    assert sum(h.seller.billed.values()) == 2, "the other two were paid for; the held one was not"
    progress = h.deps.runs.progress(chunk.run_id, chunk.seq)
    assert sorted(progress) == [0, 2], "their records are kept for the next delivery"


@pytest.mark.parametrize("result_as_string", [False, True], ids=["object", "json-string"])
def test_a_paid_answer_left_unrecorded_by_a_crash_is_recorded_by_the_next_delivery_without_paying(
        result_as_string: bool) -> None:
    h = harness(settings())
    h.seller.result_as_string = result_as_string
    chunk = chunk_of(h, 10)
    processor = ChunkProcessor(h.deps)
    original = processor._record_answer

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt("the worker dies after the ledger kept the answer")

    processor._record_answer = crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        processor.run(chunk)
    assert totals(h)["unrecorded_answers"] == 1 and h.deps.runs.progress(chunk.run_id, chunk.seq) == {}
    processor._record_answer = original  # type: ignore[method-assign]

    kept = h.redis.hget(f"irlive:pay:{next(iter(h.seller.payments))}", "answer") or ""
    assert "deadbeef" not in kept, "the presigned URLs' signatures are not kept with the answer"

    ChunkProcessor(h.deps).run(chunk)
    assert verdicts(h, chunk) == Counter({"live": 10}), "the kept answer was read back, not given up on"
    assert len(h.seller.calls) == 1 and totals(h)["unrecorded_answers"] == 0


def test_a_delivery_that_lost_its_lease_stops_before_paying() -> None:
    h = harness(settings())
    chunk = chunk_of(h, 10)
    h.redis.set(f"irlive:lease:chunk:{chunk.run_id}:{chunk.seq}", "another/2/token", px=60_000)
    with pytest.raises(ChunkBusy):
        ChunkProcessor(h.deps).run(chunk)
    assert h.seller.calls == []


def test_a_redelivered_chunk_resumes_and_pays_nothing_again() -> None:
    h = harness(settings())
    chunk = chunk_of(h, 20)
    ChunkProcessor(h.deps).run(chunk)
    before = len(h.seller.calls)
    assert ChunkProcessor(h.deps).run(chunk) == 0
    assert len(h.seller.calls) == before
    assert json.loads(json.dumps(records(h, chunk)))[0]["verdict"] == "live"


def test_an_object_overwritten_during_its_call_is_judged_again_with_its_new_etag() -> None:
    h = harness(settings())
    chunk = chunk_of(h, 10)
    new_bytes = png(96, 96, "spoof", seed=99)

    def overwrite_once(keys: list[str]) -> None:
        if len(h.seller.calls) == 1:
            h.storage.put(BUCKET, "img/004.png", new_bytes)

    h.seller.on_call = overwrite_once
    ChunkProcessor(h.deps).run(chunk)
    got = {r["key"]: r for r in records(h, chunk)}
    assert got["img/004.png"]["etag"] != chunk.items[4][1], "recorded against the content the seller saw"
    assert [len(c) for c in h.seller.calls] == [10, 1]
    assert run_hash(h, "run-a")["changed_during_call"] == "1"
    assert h.storage.requests["list"] == 2, "one listing per round of calls to check nothing changed"


def test_a_chunk_costs_one_read_per_image_one_listing_and_one_manifest_put() -> None:
    h = harness(settings())
    chunk = chunk_of(h, 50)
    ChunkProcessor(h.deps).run(chunk)
    assert [len(c) for c in h.seller.calls] == [10] * 5
    assert {r["verdict"] for r in records(h, chunk)} <= {"live", "spoof", "no_face"}
    # The answers are recorded once one listing says none of their objects was overwritten meanwhile.
    assert dict(h.storage.requests) == {"get": 50, "list": 1, "put": 1}
    run = run_hash(h, "run-a")
    assert (run["calls_ended"], run["calls_in_flight"]) == ("5", "0")


def test_a_chunks_validation_reads_go_together_when_s3_makes_them_wait() -> None:
    h = harness(settings())
    h.deps.reads = ThreadPoolExecutor(8)
    chunk = chunk_of(h, 50)
    read_head = h.storage.read_head
    together = threading.Condition()
    state = {"in_flight": 0, "most": 0, "reads": 0, "alone": False}

    def slow_read(bucket: str, key: str, max_bytes: int) -> Any:
        time.sleep(0.02)  # S3's time to first byte (not a synchronisation: what the chunk must not wait 50 times)
        with together:
            state["reads"] += 1
            state["in_flight"] += 1
            state["most"] = max(state["most"], state["in_flight"])
            together.notify_all()
            # After the first (read alone: it tells S3 is slow), each waits, with a deadline, for three others to
            # be under way beside it.
            if state["reads"] > 1 and not state["alone"] and not together.wait_for(
                    lambda: state["most"] >= 4, timeout=5):
                state["alone"] = True  # read one after another: the rest need not wait to show it
        try:
            return read_head(bucket, key, max_bytes)
        finally:
            with together:
                state["in_flight"] -= 1

    h.storage.read_head = slow_read  # type: ignore[method-assign]
    ChunkProcessor(h.deps).run(chunk)
    assert state["most"] >= 4, f"at most {state['most']} validation reads were under way at once"
    # Taken in the chunk's order all the same: each record is its own image's.
    assert [r["key"] for r in records(h, chunk)] == [key for key, _ in chunk.items]
    assert verdicts(h, chunk) == Counter({"live": 50}) and [len(c) for c in h.seller.calls] == [10] * 5


def test_validation_reads_s3_answers_at_once_stay_in_the_chunks_thread() -> None:
    h = harness(settings())
    h.deps.reads = ThreadPoolExecutor(8)
    chunk = chunk_of(h, 20)
    read_head = h.storage.read_head
    threads: set[int] = set()

    def read(bucket: str, key: str, max_bytes: int) -> Any:
        threads.add(threading.get_ident())
        return read_head(bucket, key, max_bytes)

    h.storage.read_head = read  # type: ignore[method-assign]
    ChunkProcessor(h.deps).run(chunk)
    assert threads == {threading.get_ident()} and h.storage.requests["get"] == 20


def test_a_failed_read_keeps_the_validations_before_it_and_asks_s3_nothing_more_until_the_next_delivery() -> None:
    # The harness runs reads one after another when their results are taken (tests/stubs.py InlineExecutor).
    h = harness(settings())
    chunk = chunk_of(h, 20)
    read_head = h.storage.read_head
    fails = {"img/005.png": 1}

    def flapping(bucket: str, key: str, max_bytes: int) -> Any:
        if fails.get(key):
            fails[key] -= 1
            h.storage.requests["get"] += 1
            raise TransientError(f"s3://{bucket}/{key}: S3 answered 503")
        return read_head(bucket, key, max_bytes)

    h.storage.read_head = flapping  # type: ignore[method-assign]
    with pytest.raises(TransientError):
        ChunkProcessor(h.deps).run(chunk)
    assert h.storage.requests["get"] == 6 and not h.seller.calls, "the reads after the failed one were cancelled"
    assert sorted(map(int, h.redis.hkeys(f"irlive:run:{chunk.run_id}:chunk:{chunk.seq}:checked"))) == [0, 1, 2, 3, 4]
    assert ChunkProcessor(h.deps).run(chunk) == 0
    assert h.storage.requests["get"] == 6 + 15, "the next delivery read only what was not validated"
    assert verdicts(h, chunk) == Counter({"live": 20})


def test_a_deferred_chunk_does_not_read_its_images_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "MAX_THROTTLES_PER_CHUNK", 1)
    h = harness(settings())
    chunk = chunk_of(h, 30)
    h.seller.script.extend(["ok", "429", "429"])
    with pytest.raises(RateLimited):
        ChunkProcessor(h.deps).run(chunk)
    # Deferred before every call was paid (the chunk's calls go together: which one is throttled varies).
    assert h.storage.requests["get"] == 30 and len(h.seller.calls) < 3
    assert ChunkProcessor(h.deps).run(chunk) == 0
    assert h.storage.requests["get"] == 30, "the first delivery's validations were used"
    assert verdicts(h, chunk) == Counter({"live": 30}) and [len(c) for c in h.seller.calls] == [10, 10, 10]
    # The chunk is complete: what was kept for its next delivery is gone.
    assert not h.redis.exists(f"irlive:run:{chunk.run_id}:chunk:{chunk.seq}:checked")


def test_finalising_writes_the_run_manifest_without_reading_the_chunk_manifests_back() -> None:
    h = harness(settings())
    chunks = [chunk_of(h, 12, bad=(3,)), chunk_of(h, 12, prefix="more")]
    assert [ChunkProcessor(h.deps).run(c) for c in chunks] == [1, 0]
    puts = {key: etag_of(h.storage.objects[("out-bucket", key)]) for (_, key) in h.storage.objects
            if "/chunks/" in key}
    manifest = finalize_run(h.deps.runs, h.deps.storage, h.deps.ledger, "run-a")
    assert manifest is not None and h.storage.read_back == []
    assert {c["key"]: c["etag"] for c in manifest["chunks"]} == puts
    assert (manifest["counts"]["rejected"], manifest["failed"]["count"]) == (1, 1), manifest["failed"]
    # Chunks without a summary (restored by a redrive of an archived run) are read from their manifests.
    other = [chunk_of(h, 12, run_id="run-b", prefix="b1", bad=(3,)), chunk_of(h, 12, run_id="run-b", prefix="b2")]
    assert [ChunkProcessor(h.deps).run(c) for c in other] == [1, 0]
    h.redis.delete("irlive:run:run-b:chunk-summaries")
    h.storage.read_back.clear()
    again = finalize_run(h.deps.runs, h.deps.storage, h.deps.ledger, "run-b")
    assert again is not None and [k.rsplit("/", 3)[1:] for k in h.storage.read_back] == [
        ["run-b", "chunks", "000000.json"], ["run-b", "chunks", "000001.json"]]
    assert [c["counts"] for c in again["chunks"]] == [c["counts"] for c in manifest["chunks"]]


def test_finalising_reads_each_payment_once_and_still_archives_one_settled_meanwhile(
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness(settings())
    assert ChunkProcessor(h.deps).run(chunk_of(h, 40)) == 0
    written: list[str] = []
    real_put = h.storage.put_bytes

    def put_bytes(bucket: str, key: str, body: bytes, content_type: str) -> str:
        if key.endswith("payments.jsonl"):
            written.append(body.decode())
        return real_put(bucket, key, body, content_type)

    monkeypatch.setattr(h.storage, "put_bytes", put_bytes)
    finalize_run(h.deps.runs, h.deps.storage, h.deps.ledger, "run-a")
    assert len(written) == 1 and len(written[0].splitlines()) == 4, "the four payments, written (and read) once"
    assert not h.redis.keys("irlive:pay:*"), "archived: forgotten in Redis"

    # A payment of another run settled between its payments file and its archive (a late reconciliation):
    # read again, written again, then forgotten with the rest (run-b's own images are copies: paid nothing).
    assert ChunkProcessor(h.deps).run(chunk_of(h, 10, run_id="run-b", prefix="copies")) == 0
    real_publish = finalize._publish

    def publish_then_settle(*args: Any, **kwargs: Any) -> Any:
        h.redis.hset("irlive:pay:pay-late", mapping={"state": "spent", "run_id": "run-b", "request_id": "r-late",
                                                     "amount_cents": "20"})
        h.redis.sadd("irlive:run:run-b:payments", "pay-late")
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(finalize, "_publish", publish_then_settle)
    written.clear()
    finalize_run(h.deps.runs, h.deps.storage, h.deps.ledger, "run-b")
    assert len(written) == 2 and "pay-late" not in written[0] and "pay-late" in written[1]
    assert not h.redis.keys("irlive:pay:*")

    # A payment spent with its answer lost may still take a late answer (settle.lua keeps it on the record):
    # read and written again too.
    ChunkProcessor(h.deps).run(chunk_of(h, 10, run_id="run-c", prefix="more-copies"))
    h.redis.hset("irlive:pay:pay-lost", mapping={"state": "spent", "run_id": "run-c", "lost": "1",
                                                 "amount_cents": "20"})
    h.redis.sadd("irlive:run:run-c:payments", "pay-lost")

    def publish_then_answer(*args: Any, **kwargs: Any) -> Any:
        h.redis.hset("irlive:pay:pay-lost", mapping={"request_id": "r-answered", "lost": "0"})
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(finalize, "_publish", publish_then_answer)
    written.clear()
    finalize_run(h.deps.runs, h.deps.storage, h.deps.ledger, "run-c")
    assert len(written) == 2 and "r-answered" not in written[0] and "r-answered" in written[1]


def test_redis_loading_for_a_moment_after_a_paid_answer_loses_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    h = harness(settings())
    chunk = chunk_of(h, 10)
    real_evalsha = h.redis.evalsha
    settle = script_sha("money", "settle")
    failures = {"left": 3}

    def flaky_evalsha(sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        # Right after the seller answered: Redis restarting (loading its AOF) while the answer is settled.
        if h.seller.calls and sha == settle and failures["left"] > 0:
            failures["left"] -= 1
            raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")
        return real_evalsha(sha, numkeys, *keys_and_args)

    monkeypatch.setattr(h.redis, "evalsha", flaky_evalsha)
    monkeypatch.setattr("time.sleep", lambda s: None)
    ChunkProcessor(h.deps).run(chunk)
    assert failures["left"] == 0
    assert verdicts(h, chunk) == Counter({"live": 10}) and len(h.seller.calls) == 1
    assert run_hash(h, "run-a").get("answers_lost") is None
