"""Writing what people read next to a run's manifest: results.csv (and .parquet), report.html, the run's
history summary and the output's index.html; and reading a finished run back from S3 for `irlive report`."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup

from worker.config import S3Location
from worker.errors import NotFound, UnknownRun
from worker.judge.manifest import (
    history_key,
    history_prefix,
    index_key,
    iso_ms,
    payments_key,
    report_key,
    results_key,
    run_manifest_key,
)
from worker.report import charts, model, render, results
from worker.seams.storage import Storage

log = logging.getLogger("irlive.report")

# The history page lists this many runs (newest first) and charts the nights they cover.
HISTORY_RUNS = 400
CHART_NIGHTS = 30
CHART_CAMERAS = 8
# A summary keeps this many cameras (the busiest): a bucket of 10,000 cameras must not make it megabytes.
SUMMARY_CAMERAS = 200
_READERS = 16


@dataclass(frozen=True)
class RunFiles:
    """A finished run as S3 holds it."""

    manifest: dict[str, Any]
    records: list[dict[str, Any]]
    payments: list[dict[str, Any]]


def load_run(storage: Storage, output: S3Location, run_id: str) -> RunFiles:
    """The run's manifest, every chunk's records (read in parallel) and its payments."""
    try:
        manifest, _ = storage.get_json(output.bucket, run_manifest_key(output, run_id))
    except NotFound as exc:
        raise UnknownRun(f"run {run_id} has no manifest under {output} yet: it has not finished, or it wrote "
                         "to another IRLIVE_OUTPUT") from exc

    def chunk(key: str) -> list[dict[str, Any]]:
        doc, _ = storage.get_json(output.bucket, key)
        return list(doc["images"])

    with ThreadPoolExecutor(_READERS) as pool:
        records = [r for rs in pool.map(chunk, [c["key"] for c in manifest["chunks"]]) for r in rs]
    payments: list[dict[str, Any]] = []
    try:
        body = storage.get_bytes(output.bucket, payments_key(output, run_id))
        payments = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    except NotFound:
        pass
    return RunFiles(manifest, records, payments)


def publish_run(storage: Storage, output: S3Location, manifest: Mapping[str, Any],
                records: Sequence[Mapping[str, Any]], payments: Sequence[Mapping[str, Any]], *,
                live_below: float) -> dict[str, Any]:
    """Write results, report, history summary and index; return what the manifest says of them."""
    run_id = str(manifest["run_id"])
    table = results.rows(records, payments)
    written: dict[str, Any] = {"results": {"csv": results_key(output, run_id, "csv"), "parquet": None}}
    storage.put_bytes(output.bucket, written["results"]["csv"], results.to_csv(table), "text/csv")
    if results.parquet_available():
        written["results"]["parquet"] = results_key(output, run_id, "parquet")
        storage.put_bytes(output.bucket, written["results"]["parquet"], results.to_parquet(table),
                          "application/vnd.apache.parquet")
    report = model.build(manifest, records, payments, live_below=live_below)
    written["report"] = report_key(output, run_id)
    storage.put_bytes(output.bucket, written["report"], render.render_report(report).encode(),
                      "text/html; charset=utf-8")
    storage.put_json(output.bucket, history_key(output, run_id, iso_ms(str(manifest.get("created_at") or ""))),
                     summary(manifest, report))
    written["index"] = write_index(storage, output)
    return written


def summary(manifest: Mapping[str, Any], report: model.Report) -> dict[str, Any]:
    """The history line of one run (what index.html and its chart read)."""
    cameras = sorted(report.sites.items(), key=lambda kv: -kv[1].get("judged", 0))[:SUMMARY_CAMERAS]
    return {
        "schema_version": 1, "kind": "history", "run_id": report.run_id, "source": manifest.get("source"),
        "state": manifest.get("state"), "created_at": manifest.get("created_at"),
        "finished_at": manifest.get("finished_at"), "images": report.images, "counts": report.counts,
        "calls": report.calls, "spend_cents": report.spend_cents, "tags": manifest.get("tags") or {},
        "report_href": f"runs/{report.run_id}/report.html", "cameras": dict(cameras),
    }


def write_index(storage: Storage, output: S3Location) -> str:
    """index.html from the newest history summaries (each run wrote its own; none is rewritten)."""
    keys = [o.key for o in storage.iter_objects(output.bucket, history_prefix(output)) if o.key.endswith(".json")]
    keys.sort()

    def read(key: str) -> dict[str, Any] | None:
        try:
            doc, _ = storage.get_json(output.bucket, key)
            return dict(doc)
        except NotFound:
            return None

    with ThreadPoolExecutor(_READERS) as pool:
        runs = [r for r in pool.map(read, keys[:HISTORY_RUNS]) if r is not None]
    key = index_key(output)
    page = render.render_index(str(output), runs, spoof_chart(runs), len(keys))
    storage.put_bytes(output.bucket, key, page.encode(), "text/html; charset=utf-8")
    return key


def spoof_rates(runs: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Spoof rate (%) per night (the last CHART_NIGHTS) for the busiest cameras; None where a camera had no
    judged capture that night."""
    per_night: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    totals: Counter[str] = Counter()
    for run in runs:
        night = model.night_of(run.get("created_at"))
        for camera, n in (run.get("cameras") or {}).items():
            per_night[night][camera].update(n)
            totals[camera] += int(n.get("judged", 0))
    nights = sorted(per_night)[-CHART_NIGHTS:]
    series: dict[str, list[float | None]] = {}
    for camera, _ in totals.most_common(CHART_CAMERAS):
        rates: list[float | None] = []
        for night in nights:
            seen = per_night[night].get(camera)
            rates.append(round(100 * seen["spoof"] / seen["judged"], 1) if seen and seen["judged"] else None)
        series[camera] = rates
    return nights, series


def spoof_chart(runs: Sequence[Mapping[str, Any]]) -> Markup | None:
    """The history page's chart: a camera whose spoof rate jumps is what a security team looks for."""
    nights, series = spoof_rates(runs)
    if not nights:
        return None
    return charts.lines("Spoof rate per night (%), busiest cameras", nights, series, percent=True)
