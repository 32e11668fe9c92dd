"""What people read of a run, through real workers and the CLI: results.csv/.parquet next to the manifest
equal to its chunk records, report.html and the history page, `irlive export`, `irlive runs --tag`, the
report's link from `scan --wait` and the webhook, and `irlive report --thumbnails`."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pyarrow.parquet as pq
import pytest

from sandbox.images import Sample, demo_corpus
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, OUT_BUCKET, OUT_PREFIX, read_run, upload, validator
from tests.test_notify import Receiver, receiver  # noqa: F401 (the fixture)
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.seams.store import Store

pytestmark = pytest.mark.integration


def _corpus(prefix: str, n: int = 40) -> list[Sample]:
    # The demo's captures: live, spoof, no face, two faces, odd names, and a few that are not images at all.
    return demo_corpus(n, seed=3, prefix=prefix)


def _scan_and_wait(stack: Stack, irlive: IrliveRunner, prefix: str, *args: str) -> tuple[str, str]:
    upload(stack, _corpus(prefix))
    stack.start_worker()
    done = irlive("scan", f"s3://{IN_BUCKET}/{prefix}", "--wait", *args, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = done.stdout.splitlines()[0].strip()
    return run_id, done.stdout


def _get(stack: Stack, key: str) -> bytes:
    body: bytes = stack.s3_client().get_object(Bucket=OUT_BUCKET, Key=key)["Body"].read()
    return body


def _expected_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"key": r["key"], "etag": r["etag"], "verdict": r["verdict"], "suggestion": r["suggestion"],
             "confidence": r["rate"], "faces": r["faces"], "error_code": r["error_code"],
             "request_id": r["request_id"]} for r in records]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def test_a_finished_run_writes_results_report_and_history_next_to_its_manifest(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    run_id, stdout = _scan_and_wait(clean_stack, irlive, "nightly", "--tag", "site=north", "--tag", "shift=night")
    output = read_run(clean_stack, run_id)
    manifest = output.manifest
    validator("run").validate(manifest)
    base = f"{OUT_PREFIX}/runs/{run_id}"
    assert manifest["tags"] == {"site": "north", "shift": "night"}
    assert manifest["report"] == f"{base}/report.html"
    assert manifest["results"] == {"csv": f"{base}/results.csv", "parquet": f"{base}/results.parquet"}
    assert f"report: s3://{OUT_BUCKET}/{base}/report.html" in stdout, "scan --wait ends with the report's link"

    records = output.records
    assert {r["verdict"] for r in records} >= {"live", "spoof", "rejected"}
    rows = list(csv.DictReader(io.StringIO(_get(clean_stack, manifest["results"]["csv"]).decode())))
    expected = _expected_rows(records)
    assert [{k: row[k] for k in expected[0]} for row in rows] == [{k: _text(v) for k, v in e.items()}
                                                                  for e in expected]
    parquet = pq.read_table(io.BytesIO(_get(clean_stack, manifest["results"]["parquet"]))).to_pylist()
    assert [{k: row[k] if k != "confidence" or row[k] is None else float(row[k]) for k in expected[0]}
            for row in parquet] == [{**e, "confidence": None if e["confidence"] is None else float(e["confidence"])}
                                    for e in expected]
    # What the rows cost adds up to what the run paid.
    assert round(sum(float(r["cost_cents"]) for r in rows)) == manifest["spend_cents"] > 0

    page = _get(clean_stack, manifest["report"]).decode()
    assert run_id in page and "site=north" in page
    assert f'id="count-spoof" class="spoof">{manifest["counts"]["spoof"]}<' in page
    index = _get(clean_stack, manifest["index"]).decode()
    assert f"runs/{run_id}/report.html" in index and "Spoof rate per night" in index
    [summary_key] = [o["Key"] for o in clean_stack.s3_client().list_objects_v2(
        Bucket=OUT_BUCKET, Prefix=f"{OUT_PREFIX}/history/")["Contents"]]
    assert json.loads(_get(clean_stack, summary_key))["run_id"] == run_id

    status = irlive("status", run_id, "--json")
    assert json.loads(status.stdout)["report"] == f"s3://{OUT_BUCKET}/{base}/report.html"


def test_a_second_run_adds_its_line_to_the_history_without_rewriting_the_first(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    first, _ = _scan_and_wait(clean_stack, irlive, "first")
    s3 = clean_stack.s3_client()
    before = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=OUT_BUCKET,
                                                               Prefix=f"{OUT_PREFIX}/history/")["Contents"]}
    upload(clean_stack, _corpus("second"))
    second = irlive("scan", f"s3://{IN_BUCKET}/second", "--wait", timeout=180).stdout.splitlines()[0].strip()
    after = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=OUT_BUCKET,
                                                              Prefix=f"{OUT_PREFIX}/history/")["Contents"]}
    assert len(after) == 2 and all(after[k] == etag for k, etag in before.items()), "the first line is untouched"
    index = _get(clean_stack, f"{OUT_PREFIX}/index.html").decode()
    assert index.index(second) < index.index(first), "newest first"


def test_export_writes_every_format_and_filters_by_verdict(clean_stack: Stack, irlive: IrliveRunner,
                                                           tmp_path: Any) -> None:
    run_id, _ = _scan_and_wait(clean_stack, irlive, "exported")
    records = read_run(clean_stack, run_id).records
    spoofs = sorted(r["key"] for r in records if r["verdict"] == "spoof")
    assert spoofs

    as_csv = irlive("export", run_id)
    assert as_csv.returncode == 0, as_csv.stderr
    assert sorted(r["key"] for r in csv.DictReader(io.StringIO(as_csv.stdout))) == sorted(r["key"] for r in records)
    as_jsonl = irlive("export", run_id, "--format", "jsonl", "--verdict", "spoof")
    assert sorted(json.loads(line)["key"] for line in as_jsonl.stdout.splitlines()) == spoofs
    target = tmp_path / "spoofs.parquet"
    as_parquet = irlive("export", run_id, "--format", "parquet", "--verdict", "spoof", "--out", str(target))
    assert as_parquet.returncode == 0, as_parquet.stderr
    assert sorted(r["key"] for r in pq.read_table(target).to_pylist()) == spoofs

    missing = irlive("export", "20990101T000000Z-nosuch")
    assert missing.returncode == 2 and "no manifest" in missing.stderr and not missing.stdout


def test_runs_finds_a_tagged_run_among_50(clean_stack: Stack, irlive: IrliveRunner) -> None:
    store, keys = Store.from_url(clean_stack.redis_url), Keys()
    runs = Runs(store, keys)
    # 49 other runs, older, some with the same key and another value, or another source.
    for i in range(49):
        runs.create(f"20261101T0000{i:02d}Z-other{i:02d}", source=f"s3://{IN_BUCKET}/{'night' if i % 2 else 'day'}",
                    output=f"s3://{OUT_BUCKET}/{OUT_PREFIX}", settings={},
                    extra={"tags": json.dumps({"site": "south" if i % 3 else "north-2", "batch": str(i)})})
    run_id, _ = _scan_and_wait(clean_stack, irlive, "tagged", "--tag", "site=north", "--tag", "batch=7")

    found = irlive("runs", "--tag", "site=north", "--json")
    assert found.returncode == 0, found.stderr
    doc = json.loads(found.stdout)
    validator("runs").validate(doc)
    assert [r["run_id"] for r in doc["runs"]] == [run_id]
    assert doc["runs"][0]["state"] == "done" and doc["runs"][0]["tags"] == {"site": "north", "batch": "7"}
    assert doc["runs"][0]["report"] == f"s3://{OUT_BUCKET}/{OUT_PREFIX}/runs/{run_id}/report.html"
    both = json.loads(irlive("runs", "--tag", "batch=7", "--json").stdout)["runs"]
    assert sorted(r["run_id"] for r in both) == sorted([run_id, "20261101T000007Z-other07"])
    assert [r["run_id"] for r in json.loads(irlive("runs", "--tag", "batch=7", "--tag", "site=north",
                                                   "--json").stdout)["runs"]] == [run_id]
    listed = json.loads(irlive("runs", "--json", "--limit", "50").stdout)["runs"]
    assert len(listed) == 50 and listed[0]["run_id"] == run_id, "newest first"
    assert len(json.loads(irlive("runs", "--state", "done", "--json").stdout)["runs"]) == 1
    assert len(json.loads(irlive("runs", "--source", f"s3://{IN_BUCKET}/night", "--json").stdout)["runs"]) == 24
    text = irlive("runs", "--tag", "site=north")
    assert run_id in text.stdout and "site=north" in text.stdout
    bad = irlive("runs", "--tag", "no-equals-sign")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr


def test_the_webhook_links_the_report_and_carries_the_tags(clean_stack: Stack, irlive: IrliveRunner,
                                                           receiver: Receiver) -> None:  # noqa: F811
    run_id, _ = _scan_and_wait(clean_stack, irlive, "hooked", "--notify", receiver.url, "--tag", "site=east")
    [received] = receiver.wait_for(1, timeout=30)
    event = json.loads(received.body)
    validator("notification").validate(event)
    assert event["run_id"] == run_id and event["event"] == "run.done"
    assert event["report"] == f"s3://{OUT_BUCKET}/{OUT_PREFIX}/runs/{run_id}/report.html"
    assert event["tags"] == {"site": "east"}


def test_report_with_thumbnails_draws_every_capture_to_review(clean_stack: Stack, irlive: IrliveRunner,
                                                               tmp_path: Any) -> None:
    run_id, _ = _scan_and_wait(clean_stack, irlive, "thumbs")
    target = tmp_path / "report.html"
    made = irlive("report", run_id, "--out", str(target), "--thumbnails")
    assert made.returncode == 0, made.stderr
    page = target.read_text()
    rows = page.count('class="review-row"')
    assert rows > 0 and page.count('src="data:image/jpeg;base64,') == rows
    plain = irlive("report", run_id, "--out", "-")
    assert plain.returncode == 0 and "data:image" not in plain.stdout, "no capture is shown unless asked"
