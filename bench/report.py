"""Cost of a run's report: report.html and results.csv for a synthetic run of --images records, against the
plain serialisation of the same records (json.dumps of every record, what reading the chunk manifests costs),
measured in the same run. Prints seconds, sizes and the ratios. Best of --rounds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from worker.report import model, render, results

MANIFEST: dict[str, Any] = {
    "run_id": "20261206T010203Z-bench1", "source": "s3://cams/site", "state": "done", "stop_reason": None,
    "created_at": "2026-12-06T01:00:00Z", "finished_at": "2026-12-06T02:00:00Z", "calls": 0, "spend_cents": 0,
    "budget_cents": None, "tokens_bought": 0, "tokens_unspent": 0, "unknown_purchases": 0, "answers_lost": 0,
    "answers_lost_images": 0, "enforced": {"max_price_cents": 20, "images_per_call": 10, "rate_limit_per_s": 20.0},
}
_VERDICTS = ("live",) * 17 + ("spoof", "no_face", "rejected")


def synthetic_run(images: int) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """A run of `images` captures over 40 cameras on 7 sites: 5 % spoof, 5 % no face, 5 % rejected."""
    records: list[dict[str, Any]] = []
    for i in range(images):
        verdict = _VERDICTS[i % 20]
        unjudged = verdict == "rejected"
        rate = 50.0 + (i * 7919) % 50
        records.append({
            "bucket": "cams", "key": f"site{i % 7}/2026-12-0{1 + i % 5}/cam{i % 40:02d}/img_{i:06d}.png",
            "etag": f"{i:032x}", "verdict": verdict, "suggestion": None if unjudged else "pass",
            "rate": None if unjudged else rate, "faces": None if unjudged else 1 + (i % 97 == 0),
            "face_results": [] if unjudged else [{"suggestion": "pass", "rate": rate,
                                                  "rect": {"Left": 10, "Top": 10, "Width": 60, "Height": 70}}],
            "reason": "not an image" if unjudged else None, "error_code": "not_an_image" if unjudged else None,
            "request_id": None if unjudged else f"req-{i // 10}",
            "judged_at": f"2026-12-06T01:{(i * 60 // max(images, 1)):02d}:00Z",
        })
    calls = images // 10
    payments = [{"state": "spent", "amount_cents": "20", "sent_ms": str(1_765_000_800_000 + i * 360),
                 "updated_ms": str(1_765_000_800_000 + i * 360 + 1000 + i % 300),
                 "images": ",".join(f"cams/{r['key']}@{r['etag']}" for r in records[i * 10:i * 10 + 10])}
                for i in range(calls)]
    manifest = {**MANIFEST, "images": images, "calls": calls, "spend_cents": 20 * calls}
    return manifest, records, payments


def best(rounds: int, work: Callable[[], object]) -> tuple[float, object]:
    times, out = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        out = work()
        times.append(time.perf_counter() - started)
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    ns = parser.parse_args(argv)
    manifest, records, payments = synthetic_run(ns.images)
    base_s, base = best(ns.rounds, lambda: "\n".join(json.dumps(r) for r in records))
    page_s, page = best(ns.rounds, lambda: render.render_report(model.build(manifest, records, payments)))
    csv_s, table = best(ns.rounds, lambda: results.to_csv(results.rows(records, payments)))
    assert isinstance(page, str) and isinstance(table, bytes) and isinstance(base, str)
    print(f"{ns.images:,} images, best of {ns.rounds}")
    print(f"  baseline  json.dumps of every record   {base_s:6.2f} s  {len(base) / 1e6:6.1f} MB")
    print(f"  report    report.html                  {page_s:6.2f} s  {len(page.encode()) / 1e6:6.2f} MB  "
          f"ratio {page_s / base_s:.2f}")
    print(f"  results   results.csv                  {csv_s:6.2f} s  {len(table) / 1e6:6.2f} MB  "
          f"ratio {csv_s / base_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
