"""A scan: list a prefix, filter, deduplicate against the done-set, create the run, enqueue chunks by name."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from producer.chunking import chunked
from producer.estimate import Estimate, calls_for
from producer.filters import image_objects
from worker.app import send_chunk, send_finalize
from worker.config import S3Location, Settings
from worker.flow.claims import Claims
from worker.flow.runs import Runs
from worker.judge.manifest import Item
from worker.messages import DEFAULT_PRIORITY, Chunk
from worker.seams.storage import ObjectInfo, Storage


@dataclass(frozen=True)
class ScanRequest:
    """What the user asked for."""

    source: S3Location
    suffixes: tuple[str, ...]
    limit: int | None = None
    force: bool = False
    budget_cents: int | None = None
    # The queue the run's chunks go to: events, nightly (the default) or backfill.
    priority: str = DEFAULT_PRIORITY


@dataclass
class ScanResult:
    """What a scan did."""

    run_id: str
    found: int = 0
    skipped: int = 0
    enqueued: int = 0
    chunks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "found": self.found, "already_judged": self.skipped,
                "enqueued": self.enqueued, "chunks": self.chunks}


# (listed, still to judge)
Page = tuple[list[ObjectInfo], list[ObjectInfo]]


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def list_images(storage: Storage, request: ScanRequest, output: S3Location) -> Iterator[ObjectInfo]:
    exclude = output.key("runs") if output.bucket == request.source.bucket else None
    prefix = request.source.prefix + "/" if request.source.prefix else ""
    objects = image_objects(storage.iter_objects(request.source.bucket, prefix), request.suffixes, exclude)
    for n, obj in enumerate(objects):
        if request.limit is not None and n >= request.limit:
            return
        yield obj


def pages(settings: Settings, storage: Storage, claims: Claims, request: ScanRequest,
          output: S3Location) -> Iterator[Page]:
    """(listed, still to judge) one chunk-sized page at a time; memory stays one page deep."""
    storage.check_bucket(request.source.bucket)
    storage.check_bucket(output.bucket)
    for page in chunked(list_images(storage, request, output), settings.chunk_size):
        yield page, page if request.force else _unjudged(claims, request.source.bucket, page)


def estimate(settings: Settings, storage: Storage, claims: Claims, request: ScanRequest, output: S3Location,
             price_cents: int, price_source: str) -> Estimate:
    """The dry run: list, filter and deduplicate exactly as a scan would, enqueue nothing, spend nothing."""
    found = judged = 0
    sizes: list[int] = []
    for page, fresh in pages(settings, storage, claims, request, output):
        found += len(page)
        judged += len(page) - len(fresh)
        if fresh:
            sizes.append(len(fresh))
    return Estimate(found=found, already_judged=judged, to_judge=sum(sizes), chunks=len(sizes),
                    calls=calls_for(sizes, settings.images_per_call), price_cents=price_cents,
                    price_source=price_source, max_attempts=settings.max_attempts)


def scan(settings: Settings, storage: Storage, runs: Runs, claims: Claims, app: Celery, request: ScanRequest,
         output: S3Location, on_progress: Callable[[ScanResult], None] | None = None) -> ScanResult:
    """Create a run and enqueue its chunks while listing."""
    listing = pages(settings, storage, claims, request, output)
    first = next(listing, None)  # checks the buckets before a run record exists
    run_id = new_run_id()
    runs.create(run_id, source=str(request.source), output=str(output), budget_cents=request.budget_cents,
                settings={**settings.producer_view(), "force": request.force, "suffixes": list(request.suffixes),
                          "priority": request.priority})
    result = ScanResult(run_id)
    if first is not None:
        for page, fresh in _chain(first, listing):
            result.found += len(page)
            result.skipped += len(page) - len(fresh)
            runs.add_skipped(run_id, len(page) - len(fresh))
            if fresh:
                items = [(o.key, o.etag) for o in fresh]
                seq = runs.add_chunk(run_id, items)
                chunk = Chunk(run_id, seq, request.source.bucket, items, request.priority)
                send_chunk(app, chunk)
                result.enqueued += len(fresh)
                result.chunks += 1
            if on_progress:
                on_progress(result)
    if runs.listing_finished(run_id) == 0:
        # Nothing was enqueued (or everything finished already): finalise now so the run still ends.
        send_finalize(app, run_id)
    return result


def _chain(first: Page, rest: Iterator[Page]) -> Iterator[Page]:
    yield first
    yield from rest


def _unjudged(claims: Claims, bucket: str, page: list[ObjectInfo]) -> list[ObjectInfo]:
    seen = claims.judged([Item(bucket, o.key, o.etag).identity for o in page])
    return [o for o, s in zip(page, seen, strict=True) if s is None]
