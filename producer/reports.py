"""`irlive report`, `irlive export` and `irlive runs`: what people read of their runs, from S3 and Redis."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.config import S3Location
from worker.errors import ConfigError, IrliveError
from worker.flow.runs import Runs
from worker.judge.manifest import report_key
from worker.keys import Keys
from worker.report import model, render, results
from worker.report.publish import RunFiles, load_run
from worker.seams.storage import Storage
from worker.seams.store import Store

_TAG = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
THUMB_SIDE = 160
_THUMB_READERS = 8


def parse_tag(text: str) -> tuple[str, str]:
    """`KEY=VALUE`: a key of letters, digits and `_.:/-`, a value of printable characters (at most 256)."""
    key, sep, value = text.partition("=")
    if not sep or not _TAG.match(key):
        raise ValueError(f"{text!r} is not KEY=VALUE (KEY: letters, digits, _ . : / -, at most 64)")
    if len(value) > 256 or not value.isprintable():
        raise ValueError(f"the value of tag {key!r} must be printable and at most 256 characters")
    return key, value


def run_output(runs: Runs, run_id: str, fallback: S3Location | None) -> S3Location:
    """Where a run wrote its manifests: its record says; else --output or IRLIVE_OUTPUT."""
    run = runs.get(run_id)
    if run is not None and run.get("output"):
        return S3Location.parse(str(run["output"]), "run output")
    if fallback is None:
        raise ConfigError(f"run {run_id} is not in Redis: say where its manifests are with --output "
                          "s3://bucket/prefix (or IRLIVE_OUTPUT)")
    return fallback


def report_uri(output: S3Location, run_id: str) -> str:
    return f"s3://{output.bucket}/{report_key(output, run_id)}"


# ---- irlive report -------------------------------------------------------------------------------------------

def build_report(storage: Storage, output: S3Location, run_id: str, *, live_below: float,
                 thumbnails: bool) -> str:
    files = load_run(storage, output, run_id)
    report = model.build(files.manifest, files.records, files.payments, live_below=live_below)
    thumbs = make_thumbnails(storage, report.review) if thumbnails else None
    return render.render_report(report, thumbnails=thumbs)


def make_thumbnails(storage: Storage, items: Sequence[model.ReviewItem]) -> dict[str, str]:
    """A small JPEG per capture to review, the seller's face rectangles drawn on it, as data: URIs (the page
    stays one file). A capture that cannot be read or decoded gets none."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise ConfigError("--thumbnails needs Pillow: pip install 'irlive[thumbnails]'") from exc

    def one(item: model.ReviewItem) -> tuple[str, str | None]:
        try:
            data = storage.get_bytes(item.bucket, item.key)
            with Image.open(io.BytesIO(data)) as opened:
                image = opened.convert("RGB")
        except (IrliveError, OSError, ValueError, Image.DecompressionBombError):
            return item.key, None
        scale = THUMB_SIDE / max(image.size)
        draw = ImageDraw.Draw(image)
        width = max(1, round(2 / scale)) if scale < 1 else 2
        for left, top, w, h in item.rects:
            draw.rectangle((left, top, left + w, top + h), outline=(230, 40, 40), width=width)
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=80)
        return item.key, "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()

    with ThreadPoolExecutor(_THUMB_READERS) as pool:
        return {key: uri for key, uri in pool.map(one, items) if uri is not None}


# ---- irlive export -------------------------------------------------------------------------------------------

def export(files: RunFiles, fmt: str, verdict: str | None) -> bytes:
    return results.encode(results.rows(files.records, files.payments, verdict), fmt)


# ---- irlive runs ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunQuery:
    """Which runs `irlive runs` lists."""

    states: tuple[str, ...] = ()
    source_prefix: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    since: datetime | None = None
    limit: int = 50


def find_runs(store: Store, keys: Keys, query: RunQuery, *, batch: int = 200) -> list[dict[str, Any]]:
    """The runs that match, newest first, read from Redis in batches (one pipeline each)."""
    found: list[dict[str, Any]] = []
    since_s = query.since.timestamp() if query.since else None
    start = 0
    while len(found) < query.limit:
        ids: list[str] = store.zrevrange(keys.runs(), start, start + batch - 1)
        if not ids:
            break
        start += batch
        pipe = store.pipeline(transaction=False)
        for run_id in ids:
            pipe.hgetall(keys.run(run_id))
        for run_id, run in zip(ids, pipe.execute(), strict=True):
            if not run:
                continue
            row = run_row(run_id, run)
            if since_s is not None and row["created_ms"] / 1000 < since_s:
                return found  # newest first: everything after is older
            if matches(row, query):
                found.append(row)
                if len(found) >= query.limit:
                    break
    return found


def run_row(run_id: str, run: Mapping[str, Any]) -> dict[str, Any]:
    """One line of `irlive runs --json` (docs/schemas/runs.schema.json)."""
    try:
        tags = json.loads(str(run.get("tags") or "{}"))
    except ValueError:
        tags = {}
    output = str(run.get("output") or "")
    report = None
    if run.get("finalised_at") and output:
        report = report_uri(S3Location.parse(output, "run output"), run_id)
    return {
        "run_id": run_id, "state": str(run.get("state") or ""), "source": str(run.get("source") or ""),
        "created_at": run.get("created_at") or None, "finished_at": run.get("finished_at") or None,
        "created_ms": int(run.get("created_ms") or 0), "images": int(run.get("total") or 0),
        "done": int(run.get("done") or 0), "calls": int(run.get("calls") or 0),
        "spend_cents": int(run.get("spend_cents") or 0), "tags": tags if isinstance(tags, dict) else {},
        "report": report,
    }


def matches(row: Mapping[str, Any], query: RunQuery) -> bool:
    if query.states and row["state"] not in query.states:
        return False
    if query.source_prefix and not str(row["source"]).startswith(query.source_prefix):
        return False
    return all(row["tags"].get(k) == v for k, v in query.tags)


def render_runs(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "no runs match"
    lines = [f"{'RUN':<25} {'STATE':<14} {'CREATED':<21} {'IMAGES':>7} {'SPENT':>9}  SOURCE  TAGS"]
    for row in rows:
        tags = " ".join(f"{k}={v}" for k, v in sorted(row["tags"].items()))
        lines.append(f"{row['run_id']:<25} {row['state']:<14} {row['created_at'] or '-'!s:<21} "
                     f"{row['images']:>7} {'$' + format(row['spend_cents'] / 100, ',.2f'):>9}  {row['source']}  {tags}")
    return "\n".join(lines)
