"""worker.judge.manifest: keys, image identity, chunk and run documents, failed.jsonl (pure, no servers)."""

from __future__ import annotations

import json
from typing import Any

from worker.config import S3Location
from worker.judge.manifest import (
    SCHEMA_VERSION,
    VERDICTS,
    Item,
    chunk_document,
    chunk_key,
    content_key,
    count_verdicts,
    failed_key,
    failed_lines,
    judged_record,
    run_document,
    run_manifest_key,
    same_content_record,
    sha256_content_key,
    unjudged_record,
)
from worker.judge.verdicts import Face, Judgement

OUT = S3Location("irlive-out", "results")
NOW = "2024-01-01T00:00:00Z"
LIVE = Judgement("live", 1, "pass", 98.0, None, [Face("normal", True, 98.0, "pass", {"Left": 1}, None)])
SPOOF = Judgement("spoof", 2, "block", 80.0, "occluded",
                  [Face("normal", True, 99.0, "pass", None, None), Face("liveness", False, 80.0, "block", None, None)])
NO_FACE = Judgement("no_face", 0, "block", None, "no face detected, try again please.")


def judged(key: str, j: Judgement) -> dict[str, Any]:
    return judged_record(Item("irlive-in", key, "e1"), 100, j, request_id="req", attempts=1, judged_at=NOW)


def unjudged(key: str, verdict: str) -> dict[str, Any]:
    return unjudged_record(Item("irlive-in", key, "e2"), None, verdict, reason="why", code="InvalidImage.Format",
                           attempts=0 if verdict == "rejected" else 5, judged_at=NOW)


def test_keys_live_under_the_output_prefix_and_run() -> None:
    assert chunk_key(OUT, "r1", 7) == "results/runs/r1/chunks/000007.json"
    assert run_manifest_key(OUT, "r1") == "results/runs/r1/manifest.json"
    assert failed_key(OUT, "r1") == "results/runs/r1/failed.jsonl"


def test_keys_without_an_output_prefix_have_no_leading_slash() -> None:
    bare = S3Location("irlive-out", "")
    assert chunk_key(bare, "r1", 0) == "runs/r1/chunks/000000.json"
    assert run_manifest_key(bare, "r1") == "runs/r1/manifest.json"


def test_chunk_keys_are_deterministic_and_sort_in_sequence_order() -> None:
    assert chunk_key(OUT, "r1", 3) == chunk_key(OUT, "r1", 3)
    keys = [chunk_key(OUT, "r1", n) for n in (1, 2, 10, 100)]
    assert sorted(keys) == keys


def test_identity_is_bucket_key_at_etag() -> None:
    assert Item("irlive-in", "cam/a.png", "abc123").identity == "irlive-in/cam/a.png@abc123"
    assert Item("irlive-in", "cam/a.png", "abc123").identity != Item("irlive-in", "cam/a.png", "def456").identity


def test_judged_record_keeps_what_the_upstream_said() -> None:
    r = judged("cam/b.png", SPOOF)
    assert (r["verdict"], r["suggestion"], r["rate"], r["faces"], r["message_tips"]) == ("spoof", "block", 80.0, 2,
                                                                                        "occluded")
    assert [f["label"] for f in r["face_results"]] == ["normal", "liveness"]
    assert (r["reason"], r["error_code"], r["request_id"]) == (None, None, "req")
    json.dumps(r)


def test_unjudged_record_carries_reason_and_code() -> None:
    r = unjudged("cam/c.png", "rejected")
    assert (r["verdict"], r["reason"], r["error_code"], r["faces"]) == ("rejected", "why", "InvalidImage.Format", None)


def test_chunk_document_counts_its_images() -> None:
    records = [judged("a.png", LIVE), judged("b.png", SPOOF), judged("c.png", NO_FACE), unjudged("d.png", "error")]
    doc = chunk_document("r1", 4, records)
    assert (doc["schema_version"], doc["kind"], doc["seq"]) == (SCHEMA_VERSION, "chunk", 4)
    assert doc["counts"] == {"live": 1, "spoof": 1, "no_face": 1, "rejected": 0, "error": 1, "not_judged": 0}
    assert sum(doc["counts"].values()) == len(doc["images"])


def test_run_document_counts_equal_the_sum_of_chunk_counts() -> None:
    chunk_records = [
        [judged("a.png", LIVE), judged("b.png", LIVE), unjudged("c.png", "rejected")],
        [judged("d.png", SPOOF), judged("e.png", NO_FACE)],
        [unjudged("f.png", "error"), unjudged("g.png", "error"), judged("h.png", LIVE)],
    ]
    chunks: list[dict[str, Any]] = [
        {"seq": n, "key": chunk_key(OUT, "r1", n), "etag": f"etag{n}", "counts": count_verdicts(recs)}
        for n, recs in enumerate(chunk_records)
    ]
    run = {"run_id": "r1", "source": "s3://irlive-in/cam", "spend_cents": 60, "calls": 3, "skipped": 4}
    doc = run_document(run, chunks, {"key": failed_key(OUT, "r1"), "lines": 3})
    for verdict in VERDICTS:
        assert doc["counts"][verdict] == sum(c["counts"][verdict] for c in chunks)
    assert doc["counts"] == {"live": 3, "spoof": 1, "no_face": 1, "rejected": 1, "error": 2, "not_judged": 0}
    assert doc["images"] == 8 == sum(len(recs) for recs in chunk_records)
    assert (doc["kind"], doc["spend_cents"], doc["spend_usd"], doc["calls"], doc["skipped"]) == ("run", 60, "0.60",
                                                                                                3, 4)
    assert doc["chunks"] == chunks


def test_run_document_with_no_chunks_counts_zero() -> None:
    doc = run_document({"run_id": "r0"}, [], {})
    assert doc["images"] == 0
    assert doc["counts"] == dict.fromkeys(VERDICTS, 0)
    assert doc["spend_usd"] == "0.00"


def test_run_document_is_the_same_when_built_twice() -> None:
    chunks = [{"seq": 0, "key": "k", "etag": "e", "counts": count_verdicts([judged("a.png", LIVE)])}]
    run = {"run_id": "r1", "finished_at": NOW}
    assert json.dumps(run_document(run, chunks, {}), sort_keys=True) == json.dumps(run_document(run, chunks, {}),
                                                                                   sort_keys=True)


def test_failed_lines_hold_only_rejected_and_error() -> None:
    records = [judged("a.png", LIVE), unjudged("b.png", "rejected"), judged("c.png", SPOOF),
               judged("d.png", NO_FACE), unjudged("e.png", "error")]
    data = failed_lines(records)
    assert data.endswith(b"\n")
    lines = [json.loads(line) for line in data.decode().splitlines()]
    assert [(r["key"], r["verdict"]) for r in lines] == [("b.png", "rejected"), ("e.png", "error")]


def test_failed_lines_empty_when_everything_was_judged() -> None:
    assert failed_lines([judged("a.png", LIVE), judged("b.png", NO_FACE)]) == b""


def test_content_key_is_the_md5_etag_with_the_size_only_for_single_part_uploads() -> None:
    assert content_key("9B2CF535F27731C974343645A3985328", 10) == "md5:9b2cf535f27731c974343645a3985328:10"
    assert content_key("9b2cf535f27731c974343645a3985328-3", 10) is None, "a multipart ETag is no MD5"
    assert content_key("9b2cf535f27731c974343645a3985328", None) is None
    assert sha256_content_key(b"abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad:3")


def test_a_copy_names_the_judged_object_and_pays_nothing() -> None:
    first = judged("cam/a.png", LIVE)
    copy = same_content_record(Item("other", "cam2/a.png", "e2"), 5, "live", first, run_id="r0", seq=3,
                               judged_at="2026-11-30T00:00:00Z")
    assert copy["same_content_as"] == {"run_id": "r0", "seq": 3, "bucket": first["bucket"], "key": "cam/a.png",
                                       "etag": first["etag"]}
    assert (copy["bucket"], copy["key"], copy["etag"], copy["attempts"]) == ("other", "cam2/a.png", "e2", 0)
    assert "duplicate_of" not in copy and copy["verdict"] == "live"
