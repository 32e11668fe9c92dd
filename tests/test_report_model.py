"""The report's figures, results rows and pages from records (pure: no servers): the review list's order and
cap, cost shares, escaping, a page that fetches nothing, and the size of a 100,000-image report."""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any

import pyarrow.parquet as pq
import pytest

from bench.report import synthetic_run
from worker.judge.manifest import join_identities
from worker.report import model, render, results
from worker.report.publish import spoof_rates, summary

MANIFEST: dict[str, Any] = {
    "run_id": "20261206T010203Z-abc123", "source": "s3://cams/site-a", "state": "done", "stop_reason": None,
    "created_at": "2026-12-06T01:02:03Z", "finished_at": "2026-12-06T01:12:03Z", "calls": 3, "spend_cents": 60,
    "budget_cents": 100, "tokens_bought": 3, "tokens_unspent": 0, "unknown_purchases": 0, "answers_lost": 1,
    "answers_lost_images": 2, "enforced": {"max_price_cents": 20, "images_per_call": 10, "rate_limit_per_s": 5.0},
    "tags": {"site": "a"},
}


def rec(key: str, verdict: str, rate: float | None = 95.0, *, suggestion: str = "pass", faces: int = 1,
        face_marks: tuple[str, ...] = (), code: str | None = None, etag: str = "e1",
        judged_at: str = "2026-12-06T01:05:00Z") -> dict[str, Any]:
    face_results = [{"suggestion": m, "rate": rate, "rect": {"Left": 1, "Top": 2, "Width": 30, "Height": 40}}
                    for m in (face_marks or ("pass",) * faces)]
    unjudged = verdict in ("rejected", "error", "not_judged")
    return {"bucket": "cams", "key": key, "etag": etag, "verdict": verdict, "suggestion": None if unjudged
            else suggestion, "rate": None if unjudged else rate, "faces": None if unjudged else faces,
            "face_results": [] if unjudged else face_results, "reason": f"why {code}" if code else None,
            "error_code": code, "request_id": None if unjudged else "req-1", "judged_at": judged_at}


def test_the_review_list_puts_spoofs_first_then_block_review_many_faces_and_unsure_live() -> None:
    records = [
        rec("a/live-sure.png", "live", 99.0),
        rec("a/live-unsure.png", "live", 61.0),
        rec("a/live-less-unsure.png", "live", 75.0),
        rec("a/two-faces.png", "live", 97.0, faces=2),
        rec("a/review.png", "live", 90.0, face_marks=("review",)),
        rec("a/block.png", "live", 90.0, face_marks=("block",)),
        rec("a/spoof-unsure.png", "spoof", 55.0, suggestion="review"),
        rec("a/spoof-sure.png", "spoof", 98.0, suggestion="block"),
        rec("a/noface.png", "no_face", None, suggestion="block", faces=0),
        rec("a/bad.png", "rejected", code="not_an_image"),
    ]
    report = model.build(MANIFEST, records, [], live_below=80.0)
    assert [i.key for i in report.review] == [
        "a/spoof-sure.png", "a/spoof-unsure.png", "a/block.png", "a/review.png", "a/two-faces.png",
        "a/live-unsure.png", "a/live-less-unsure.png"]
    assert report.review[0].why == "spoof" and report.review[-1].why.startswith("live at 75%")
    assert report.review_total == 7 and report.review_counts == {
        "spoof": 2, "marked block": 1, "marked review": 1, "2 faces": 1, "live": 2}
    assert report.review[0].rects == ((1, 2, 30, 40),)


def test_the_review_threshold_is_the_setting() -> None:
    records = [rec("a/x.png", "live", 70.0)]
    assert model.build(MANIFEST, records, [], live_below=80.0).review_total == 1
    assert model.build(MANIFEST, records, [], live_below=60.0).review_total == 0


def test_a_huge_review_list_is_capped_and_says_how_many_there_are() -> None:
    records = [rec(f"a/s{i:05d}.png", "spoof", 90.0 + (i % 10)) for i in range(model.REVIEW_CAP + 500)]
    report = model.build(MANIFEST, records, [])
    assert len(report.review) == model.REVIEW_CAP and report.review_total == model.REVIEW_CAP + 500
    page = render.render_report(report)
    assert f"Showing the first {model.REVIEW_CAP} of {model.REVIEW_CAP + 500}" in page
    assert page.count('class="review-row"') == model.REVIEW_CAP


def test_a_camera_is_its_folder_without_dated_folders() -> None:
    assert model.camera_of("site-a/2026-11-21/cam01/img.png") == "site-a/cam01"
    assert model.camera_of("site-a/20261121/cam01/img.png") == "site-a/cam01"
    assert model.camera_of("cam07/img.png") == "cam07"
    assert model.camera_of("img.png") == "(top)"


def test_money_latency_and_errors_come_from_the_records() -> None:
    records = [rec(f"a/{i}.png", "live") for i in range(12)] + [
        rec("a/r1.png", "rejected", code="not_an_image"), rec("a/r2.png", "rejected", code="not_an_image"),
        rec("a/e1.png", "error", code="InvalidImage.Download")]
    payments = [{"state": "spent", "amount_cents": "20", "sent_ms": str(1000 + i), "updated_ms": str(1000 + i + ms),
                 "images": ""} for i, ms in enumerate((100, 200, 300, 400))] + [{"state": "void"}]
    report = model.build(MANIFEST, records, payments)
    assert report.judged == 12 and report.counts["rejected"] == 2 and report.counts["error"] == 1
    assert report.estimate_cents == 2 * 20, "13 images to judge: two calls at the price cap"
    assert report.left_cents == 40 and report.cost_per_image_cents == pytest.approx(5.0)
    assert report.tokens["spent"] == 4 and report.tokens["void"] == 1
    assert report.latency_ms == {"p50": 200, "p90": 400, "p99": 400, "max": 400, "calls": 4}
    first = report.errors[0]
    assert (first.code, first.count, first.examples) == ("not_an_image", 2, ("a/r1.png", "a/r2.png"))
    assert "suffix filter" in first.advice
    assert report.errors[1].advice == model.ADVICE_BY_VERDICT["error"]


def test_cost_shares_split_each_paid_call_among_its_images() -> None:
    payments = [
        {"state": "spent", "amount_cents": "20", "images": "cams/a.png@e1,cams/b.png@e1"},
        # The answer of this one was lost: a.png was paid again.
        {"state": "spent", "amount_cents": "20", "images": "cams/a.png@e1,cams/c.png@e1,cams/d.png@e1,"
                                                              "cams/e.png@e1"},
        {"state": "void", "amount_cents": "20", "images": "cams/z.png@e1"},
    ]
    shares = results.cost_shares(payments)
    assert shares == {"cams/a.png@e1": 15.0, "cams/b.png@e1": 10.0, "cams/c.png@e1": 5.0,
                      "cams/d.png@e1": 5.0, "cams/e.png@e1": 5.0}
    assert sum(shares.values()) == 40


def test_results_csv_and_parquet_hold_one_row_per_record() -> None:
    records = [rec("a/1.png", "live", 91.5), rec("a/2, with comma \"and quote\".png", "spoof", 88.0),
               rec("a/3.png", "rejected", code="empty")]
    payments = [{"state": "spent", "amount_cents": "20",
                 "images": join_identities([f"cams/{r['key']}@e1" for r in records[:2]])}]
    table = results.rows(records, payments)
    read = list(csv.DictReader(io.StringIO(results.to_csv(table).decode())))
    assert [r["key"] for r in read] == [r["key"] for r in records]
    assert read[0]["confidence"] == "91.5" and read[0]["cost_cents"] == "10.0" and read[2]["error_code"] == "empty"
    assert read[2]["confidence"] == "" and read[2]["cost_cents"] == "0.0"
    parquet = pq.read_table(io.BytesIO(results.to_parquet(table))).to_pylist()
    assert [r["key"] for r in parquet] == [r["key"] for r in records]
    assert parquet[0]["confidence"] == 91.5 and parquet[2]["confidence"] is None and parquet[1]["faces"] == 1
    jsonl = [json.loads(line) for line in results.to_jsonl(table).decode().splitlines()]
    assert jsonl == table
    assert [r["key"] for r in results.rows(records, payments, verdict="spoof")] == [records[1]["key"]]


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def test_every_text_from_the_run_is_escaped_and_nothing_is_fetched() -> None:
    manifest = {**MANIFEST, "source": f"s3://cams/{HOSTILE}", "stop_reason": HOSTILE, "tags": {"k": HOSTILE}}
    records = [rec(f"{HOSTILE}/cam/x.png", "spoof"), rec(f"{HOSTILE}.png", "rejected", code=HOSTILE)]
    page = render.render_report(model.build(manifest, records, []))
    assert "<script" not in page and "<img" not in page and "onerror=alert(1)>" not in page
    assert "&lt;script&gt;" in page
    index = render.render_index("s3://out/x", [summary(manifest, model.build(manifest, records, []))],
                                None, 1)
    assert "<script" not in index and "&lt;script&gt;" in index
    for text in (page, index):
        # No stylesheet, script, font or image from anywhere: only the SVG namespaces name a URL.
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
        assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
        assert not re.search(r"(src|href)=\"(https?:)?//", text) and "@import" not in text


def test_the_history_chart_is_the_spoof_rate_per_night_per_camera() -> None:
    def run(created: str, cameras: dict[str, dict[str, int]]) -> dict[str, Any]:
        return {"created_at": created, "cameras": cameras}

    nights, series = spoof_rates([
        run("2026-12-04T01:00:00Z", {"a/cam1": {"judged": 100, "spoof": 1}, "a/cam2": {"judged": 50, "spoof": 0}}),
        run("2026-12-05T01:00:00Z", {"a/cam1": {"judged": 100, "spoof": 30}}),
        run("2026-12-05T13:00:00Z", {"a/cam1": {"judged": 100, "spoof": 10}}),
    ])
    assert nights == ["2026-12-04", "2026-12-05"]
    assert series == {"a/cam1": [1.0, 20.0], "a/cam2": [0.0, None]}


def test_a_report_of_100000_images_stays_small() -> None:
    manifest, records, payments = synthetic_run(100_000)
    page = render.render_report(model.build(manifest, records, payments))
    # Its time is measured by `python -m bench.report` (docs/BENCHMARKS.md), not asserted here.
    assert len(page.encode()) < 5_000_000
    assert page.count('class="review-row"') == model.REVIEW_CAP


def test_identities_with_commas_and_percents_survive_the_ledger_field() -> None:
    from worker.judge.manifest import split_identities

    identities = ["cams/a,b.png@e1", "cams/100%2C.png@e2", "cams/plain.png@e3"]
    field = join_identities(identities)
    assert field.count(",") == 2, "settle.lua counts a call's images by its commas"
    assert split_identities(field) == identities
