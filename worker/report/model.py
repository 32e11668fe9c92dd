"""The figures of one run's report, computed from its own records: the run manifest, the chunk records and
payments.jsonl (pure: no I/O). The template only lays these out."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.judge.manifest import JUDGED, UNJUDGED, iso_ms

# The price is per call of up to ten images: the cheapest an image can be judged.
FLOOR_CENTS_PER_IMAGE = 2.0
# The review list shows this many captures at most (the count says how many there are): a 100,000-image run
# with a spoof wave must still open in a browser.
REVIEW_CAP = 1000
EXAMPLES = 3
_DATED = re.compile(r"^(\d{4}-?\d{2}-?\d{2}([T_ ]?\d{2,6})?|\d{8,14})$")

# What to do about images that ended without a verdict, by error code (else by verdict).
ADVICE = {
    "not_an_image": "Not an image: remove it from the capture prefix or tighten the suffix filter.",
    "empty": "Empty object: the capture did not upload; re-upload it and scan again.",
    "truncated": "Cut short: re-upload the capture and scan again.",
    "too_large": "Over the seller's 10 MB limit: re-encode the capture smaller.",
    "too_small": "Smaller than the seller accepts: nothing to judge.",
    "too_large_dimensions": "Larger than the seller accepts: downscale the capture.",
    "unknown_dimensions": "Its dimensions could not be read: check the file.",
    "not_found": "Deleted before it was judged: nothing to do unless it should exist.",
    "access_denied": "The workers may not read it: grant s3:GetObject, then `irlive redrive`.",
    "dead_letter": "Delivered too many times: see `irlive dlq`, then `irlive redrive`.",
    "unreadable_answer": "Paid, but the answer could not be read: it is kept in payments.jsonl.",
    "changed_during_call": "Overwritten while it was judged: scan again to judge the new version.",
}
ADVICE_BY_VERDICT = {
    "rejected": "Never paid: the seller cannot use this capture as it is.",
    "error": "Tried and failed: `irlive redrive RUN` judges these again.",
    "not_judged": "The run stopped first: `irlive resume` or `irlive redrive` judges them.",
}


@dataclass(frozen=True)
class ReviewItem:
    """One capture a person should look at, and why."""

    priority: int
    why: str
    bucket: str
    key: str
    etag: str
    camera: str
    judged_at: str
    verdict: str
    suggestion: str
    confidence: float | None
    faces: int
    rects: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True)
class ErrorGroup:
    verdict: str
    code: str
    count: int
    examples: tuple[str, ...]
    reason: str
    advice: str


@dataclass
class Report:
    """Everything report.html shows about one run."""

    run_id: str
    manifest: Mapping[str, Any]
    images: int
    counts: dict[str, int]
    judged: int
    calls: int
    spend_cents: int
    estimate_cents: int
    budget_cents: int | None
    price_cents: int
    cost_per_image_cents: float | None
    duration_s: float | None
    tokens: dict[str, int]
    latency_ms: dict[str, int]
    rate_limit_per_s: float | None
    judged_over_time: list[tuple[int, int]]
    calls_over_time: list[tuple[int, float]]
    bin_s: int
    suggestions: dict[str, int]
    confidence_bins: dict[str, list[int]]
    errors: list[ErrorGroup]
    review: list[ReviewItem]
    review_total: int
    review_counts: dict[str, int]
    sites: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def left_cents(self) -> int | None:
        return None if self.budget_cents is None else self.budget_cents - self.spend_cents


def camera_of(key: str) -> str:
    """The capture's camera: its key's folder with dated folders left out (`site/2026-11-21/cam01/x.png` →
    `site/cam01`), so one camera is one line across nights."""
    parts = key.split("/")[:-1]
    kept = [p for p in parts if not _DATED.match(p)]
    return "/".join(kept) or "(top)"


def night_of(iso: str | None) -> str:
    return (iso or "")[:10] or "unknown"


def percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _rects(record: Mapping[str, Any]) -> tuple[tuple[int, int, int, int], ...]:
    found: list[tuple[int, int, int, int]] = []
    for face in record.get("face_results") or ():
        rect = face.get("rect") or {}
        try:
            found.append((int(rect["Left"]), int(rect["Top"]), int(rect["Width"]), int(rect["Height"])))
        except (KeyError, TypeError, ValueError):
            continue
    return tuple(found)


def _review_reason(record: Mapping[str, Any], live_below: float) -> tuple[int, str] | None:
    """Why a capture needs a human, most urgent first (lower priority number), or None."""
    verdict, faces = record["verdict"], record.get("faces") or 0
    marks = {str(f.get("suggestion") or "").lower() for f in record.get("face_results") or ()}
    marks.add(str(record.get("suggestion") or "").lower())
    rate = record.get("rate")
    if verdict == "spoof":
        return 0, "spoof"
    if verdict == "no_face":
        return None
    if "block" in marks:
        return 1, "marked block"
    if "review" in marks:
        return 2, "marked review"
    if faces > 1:
        return 3, f"{faces} faces"
    if verdict == "live" and isinstance(rate, int | float) and rate < live_below:
        return 4, f"live at {rate:g}% < {live_below:g}%"
    return None


def review_item(record: Mapping[str, Any], live_below: float) -> ReviewItem | None:
    reason = _review_reason(record, live_below)
    if reason is None:
        return None
    rate = record.get("rate")
    return ReviewItem(priority=reason[0], why=reason[1], bucket=record["bucket"], key=record["key"],
                      etag=record.get("etag") or "", camera=camera_of(record["key"]),
                      judged_at=record.get("judged_at") or "", verdict=record["verdict"],
                      suggestion=str(record.get("suggestion") or ""),
                      confidence=float(rate) if isinstance(rate, int | float) else None,
                      faces=int(record.get("faces") or 0), rects=_rects(record))


def _sort_key(item: ReviewItem) -> tuple[int, float, str]:
    # Spoofs the seller is surest of first; live captures the seller is least sure of first.
    confidence = item.confidence if item.confidence is not None else 0.0
    return item.priority, (confidence if item.priority == 4 else -confidence), item.key


def _bins(start_ms: int, end_ms: int) -> tuple[int, int]:
    """A bin width (seconds) giving at most ~60 bars over the run, and how many bins."""
    span_s = max(1.0, (end_ms - start_ms) / 1000)
    width = next((w for w in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
                  if span_s / w <= 60), 86400)
    return width, int(span_s // width) + 1


def build(manifest: Mapping[str, Any], records: Iterable[Mapping[str, Any]],
          payments: Iterable[Mapping[str, Any]], *, live_below: float = 80.0) -> Report:
    """The report of one run; `records` are every image's record (each chunk's `images`)."""
    payments = list(payments)
    counts: Counter[str] = Counter()
    suggestions: Counter[str] = Counter()
    confidence_bins: dict[str, list[int]] = {v: [0] * 10 for v in ("live", "spoof")}
    judged_ms: list[int] = []
    review: list[ReviewItem] = []
    review_counts: Counter[str] = Counter()
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    sites: dict[str, Counter[str]] = defaultdict(Counter)
    for record in records:
        verdict = record["verdict"]
        counts[verdict] += 1
        if verdict in UNJUDGED:
            groups[(verdict, str(record.get("error_code") or verdict))].append(record)
            continue
        camera = camera_of(record["key"])
        sites[camera]["judged"] += 1
        sites[camera]["spoof"] += verdict == "spoof"
        judged_ms.append(iso_ms(record.get("judged_at")))
        suggestions[str(record.get("suggestion") or "none")] += 1
        rate = record.get("rate")
        if verdict in confidence_bins and isinstance(rate, int | float):
            confidence_bins[verdict][min(9, max(0, int(rate // 10)))] += 1
        item = review_item(record, live_below)
        if item is not None:
            review_counts[item.why.split(" ")[0] if item.priority == 4 else item.why] += 1
            review.append(item)
    review.sort(key=_sort_key)
    judged = sum(counts[v] for v in JUDGED)
    spent = [p for p in payments if p.get("state") == "spent"]
    latencies = sorted(int(p["updated_ms"]) - int(p["sent_ms"]) for p in spent
                       if str(p.get("sent_ms") or "").isdigit() and str(p.get("updated_ms") or "").isdigit())
    sent_ms = sorted(int(p["sent_ms"]) for p in spent if str(p.get("sent_ms") or "").isdigit())
    enforced = manifest.get("enforced") or {}
    price = int(enforced.get("max_price_cents") or 20)
    per_call = int(enforced.get("images_per_call") or 10)
    spend = int(manifest.get("spend_cents") or 0)
    start = iso_ms(manifest.get("created_at"))
    end = iso_ms(manifest.get("finished_at"))
    points = [t for t in judged_ms + sent_ms if t]
    first = min([start, *points]) if start else min(points, default=0)
    last = max([end, *points]) if end else max(points, default=first)
    width, nbins = _bins(first, last)
    judged_hist = [0] * nbins
    for t in judged_ms:
        if t:
            judged_hist[min(nbins - 1, (t - first) // (width * 1000))] += 1
    calls_hist = [0] * nbins
    for t in sent_ms:
        calls_hist[min(nbins - 1, (t - first) // (width * 1000))] += 1
    tokens = {
        "bought": int(manifest.get("tokens_bought") or 0),
        "spent": len(spent),
        "void": sum(p.get("state") == "void" for p in payments),
        "unknown_purchases": int(manifest.get("unknown_purchases") or 0),
        "unspent_in_pool": int(manifest.get("tokens_unspent") or 0),
        "answers_lost": int(manifest.get("answers_lost") or 0),
        "answers_lost_images": int(manifest.get("answers_lost_images") or 0),
    }
    errors = [ErrorGroup(verdict=v, code=code, count=len(rs), examples=tuple(r["key"] for r in rs[:EXAMPLES]),
                         reason=str(rs[0].get("reason") or ""),
                         advice=ADVICE.get(code) or ADVICE_BY_VERDICT.get(v, ""))
              for (v, code), rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    to_judge = judged + counts["error"] + counts["not_judged"]
    budget = manifest.get("budget_cents")
    rate_limit = enforced.get("rate_limit_per_s")
    return Report(
        run_id=str(manifest["run_id"]), manifest=manifest, images=sum(counts.values()),
        counts={v: counts[v] for v in (*JUDGED, *UNJUDGED)}, judged=judged,
        calls=int(manifest.get("calls") or 0), spend_cents=spend,
        estimate_cents=math.ceil(to_judge / per_call) * price, budget_cents=int(budget) if budget else None,
        price_cents=price, cost_per_image_cents=spend / judged if judged else None,
        duration_s=(end - start) / 1000 if start and end else None, tokens=tokens,
        latency_ms={"p50": percentile(latencies, 0.5), "p90": percentile(latencies, 0.9),
                    "p99": percentile(latencies, 0.99), "max": latencies[-1] if latencies else 0,
                    "calls": len(latencies)},
        rate_limit_per_s=float(rate_limit) if rate_limit else None,
        judged_over_time=[(i * width, n) for i, n in enumerate(judged_hist)],
        calls_over_time=[(i * width, n / width) for i, n in enumerate(calls_hist)], bin_s=width,
        suggestions=dict(suggestions.most_common()), confidence_bins=confidence_bins, errors=errors,
        review=review[:REVIEW_CAP], review_total=len(review), review_counts=dict(review_counts),
        sites={k: dict(v) for k, v in sites.items()},
    )
