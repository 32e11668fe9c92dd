"""A scan: list a source, filter, deduplicate against the done-set, create the run, enqueue chunks by name."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

from producer.estimate import Estimate, calls_for
from producer.filters import DEFAULT_SUFFIXES, is_image_key, modified_between
from producer.sources import Listed, S3Source, Source, ahead
from worker.app import send_chunk, send_finalize
from worker.config import S3Location, Settings
from worker.errors import ConfigError
from worker.flow.claims import Claims
from worker.flow.runs import Runs
from worker.judge.manifest import Item
from worker.messages import DEFAULT_PRIORITY, Chunk
from worker.seams.storage import ObjectInfo, Storage


@dataclass(frozen=True)
class ScanRequest:
    """What the user asked for."""

    # An S3Location is listed as an S3Source (what the demo passes); any other Source as itself.
    source: S3Location | Source
    suffixes: tuple[str, ...]
    limit: int | None = None
    force: bool = False
    budget_cents: int | None = None
    # The queue the run's chunks go to: events, nightly (the default) or backfill.
    priority: str = DEFAULT_PRIORITY
    # LastModified window: since (listed from since - IRLIVE_SINCE_OVERLAP_S) <= LastModified < until.
    since: datetime | None = None
    until: datetime | None = None
    # The failure threshold the workers apply to the run (IRLIVE_MAX_ERROR_RATE / IRLIVE_MIN_CALLS by default).
    max_error_rate: float = 0.5
    min_calls: int = 20
    # Where the run's end is POSTed (else IRLIVE_NOTIFY_URL, read by the worker that finalises it).
    notify_url: str | None = None
    # Labels the user gives the run (`scan --tag k=v`): into its record, manifest, webhook and report.
    tags: tuple[tuple[str, str], ...] = ()


@dataclass
class ScanResult:
    """What a scan did."""

    run_id: str
    found: int = 0
    skipped: int = 0
    enqueued: int = 0
    chunks: int = 0
    # Rows of a list file or inventory that could not be read (skipped; see Source.bad_summary).
    bad_rows: int = 0
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "found": self.found, "already_judged": self.skipped,
                "enqueued": self.enqueued, "chunks": self.chunks, "bad_rows": self.bad_rows,
                "warnings": self.warnings}


# (bucket, listed, still to judge): one chunk's worth of one bucket
Page = tuple[str, list[ObjectInfo], list[ObjectInfo]]
# (bucket, listed): one chunk's worth of one bucket, before the done-set is asked
Listing = tuple[str, list[ObjectInfo]]
# Objects listed ahead of deduplication and enqueueing: about one S3 page, so memory stays flat (a listing is
# not held whole), and the next page's round trip and parsing overlap the Redis and broker round trips.
AHEAD_OBJECTS = 1000


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def source_of(settings: Settings, request: ScanRequest) -> Source:
    if isinstance(request.source, S3Location):
        return S3Source(request.source, settings.list_workers)
    return request.source


def watermark_name(source: Source, suffixes: tuple[str, ...]) -> str | None:
    """The name a source's watermark is kept under; a narrower suffix filter is another source (a scan of
    only .png must not move the watermark of every image). None for list files: they have no LastModified."""
    if not source.has_last_modified or source.kind == "file":
        return None
    if set(suffixes) == set(DEFAULT_SUFFIXES):
        return source.name
    return f"{source.name}?suffix={','.join(sorted(suffixes))}"


def list_from(settings: Settings, since: datetime | None) -> datetime | None:
    """Where a --since listing starts: the overlap before it catches clock skew and late-landing objects."""
    return since - timedelta(seconds=settings.since_overlap_s) if since is not None else None


def list_images(settings: Settings, storage: Storage, request: ScanRequest, output: S3Location,
                source: Source) -> Iterator[Listed]:
    if (request.since or request.until) is not None and source.kind == "file":
        raise ConfigError("--since/--until need LastModified: list files (file:) do not have it")
    lower, upper = list_from(settings, request.since), request.until
    checked = {output.bucket}
    n = 0
    for row in source.rows(storage):
        exclude = output.key("runs") if output.bucket == row.bucket else None
        if not is_image_key(row.info.key, request.suffixes, exclude):
            continue
        if not modified_between(row.info.last_modified, lower, upper):
            continue
        if request.limit is not None and n >= request.limit:
            return
        if row.bucket not in checked:
            # Inventories and list files may name several buckets: a missing one is named, once.
            storage.check_bucket(row.bucket)
            checked.add(row.bucket)
        n += 1
        yield row


def per_bucket(rows: Iterator[Listed], size: int) -> Iterator[tuple[str, list[ObjectInfo]]]:
    """Chunks of one bucket each (a chunk message names one bucket); one open chunk per bucket is held."""
    open_chunks: dict[str, list[ObjectInfo]] = {}
    for row in rows:
        batch = open_chunks.setdefault(row.bucket, [])
        batch.append(row.info)
        if len(batch) >= size:
            del open_chunks[row.bucket]
            yield row.bucket, batch
    yield from open_chunks.items()


def listed(settings: Settings, storage: Storage, request: ScanRequest, output: S3Location,
           source: Source) -> Generator[Listing, None, None]:
    """(bucket, listed) one chunk-sized page at a time, listed in a thread a page ahead of the caller; the
    buckets are checked first, in the caller's thread, so a missing one fails before anything else happens."""
    source.check(storage)
    storage.check_bucket(output.bucket)
    chunks = per_bucket(list_images(settings, storage, request, output, source), settings.chunk_size)
    yield from ahead(chunks, max(1, AHEAD_OBJECTS // settings.chunk_size))


def pages(settings: Settings, storage: Storage, claims: Claims, request: ScanRequest,
          output: S3Location, source: Source | None = None) -> Iterator[Page]:
    """(bucket, listed, still to judge) one chunk-sized page at a time; memory stays one page deep per bucket."""
    source = source or source_of(settings, request)
    for bucket, page in listed(settings, storage, request, output, source):
        yield bucket, page, page if request.force else _unjudged(claims, bucket, page)


def estimate(settings: Settings, storage: Storage, claims: Claims, request: ScanRequest, output: S3Location,
             price_cents: int, price_source: str) -> Estimate:
    """The dry run: list, filter and deduplicate exactly as a scan would, enqueue nothing, spend nothing."""
    found = judged = unknown = 0
    sizes: list[int] = []
    source = source_of(settings, request)
    for _, page, fresh in pages(settings, storage, claims, request, output, source):
        found += len(page)
        judged += len(page) - len(fresh)
        unknown += sum(1 for o in fresh if not o.etag)
        if fresh:
            sizes.append(len(fresh))
    est = Estimate(found=found, already_judged=judged, to_judge=sum(sizes), chunks=len(sizes),
                   calls=calls_for(sizes, settings.images_per_call), price_cents=price_cents,
                   price_source=price_source, max_attempts=settings.max_attempts)
    est.warnings.extend(_warnings(source, unknown))
    return est


def _warnings(source: Source, no_etag: int) -> list[str]:
    found = [w for w in [source.bad_summary()] if w]
    if no_etag:
        found.append(f"{no_etag} rows name no ETag: counted as to judge; the workers read each one's ETag and "
                     "skip those already judged before paying")
    return found


def scan(settings: Settings, storage: Storage, runs: Runs, claims: Claims, app: Celery, request: ScanRequest,
         output: S3Location, on_progress: Callable[[ScanResult], None] | None = None,
         run_id: str | None = None) -> ScanResult:
    """Create a run and enqueue its chunks while listing; `run_id` when the caller chose it (to hold a source)."""
    started = datetime.now(UTC)
    source = source_of(settings, request)
    listing = listed(settings, storage, request, output, source)
    first = next(listing, None)  # checks the buckets before a run record exists
    run_id = run_id or new_run_id()
    runs.create(run_id, source=source.name, output=str(output), budget_cents=request.budget_cents,
                settings={**settings.producer_view(), "force": request.force, "suffixes": list(request.suffixes),
                          "priority": request.priority, "since": _iso(request.since), "until": _iso(request.until),
                          "limit": request.limit},
                extra={**_watermark_fields(source, request, started), **_run_fields(request)})
    result = ScanResult(run_id)
    try:
        if first is not None:
            with _publisher(app) as send:
                for bucket, page in _chain(first, listing):
                    # The done-set check, the skipped count and the chunk's registration: one round trip.
                    done = runs.add_scanned(run_id, bucket, [(o.key, o.etag) for o in page],
                                            [bool(o.etag) and not request.force for o in page])
                    if done.ending is not None:
                        # Cancelled (or failed) while listing: what is enqueued winds down; nothing more is listed.
                        result.warnings.append(f"run {run_id} was {done.ending} while listing; listing stopped")
                        break
                    result.found += len(page)
                    result.skipped += done.skipped
                    if done.seq is not None:
                        # Registered before it is enqueued, in this thread: a failure leaves at most this one
                        # chunk counted and not sent, as before the listing had its own thread.
                        send(Chunk(run_id, done.seq, bucket, done.fresh, request.priority))
                        result.enqueued += len(done.fresh)
                        result.chunks += 1
                    if on_progress:
                        on_progress(result)
    finally:
        listing.close()  # stops the listing thread if the loop ended early
    result.bad_rows = source.bad_rows
    result.warnings = _warnings(source, 0) + result.warnings
    if runs.listing_finished(run_id) == 0:
        # Nothing was enqueued (or everything finished already): finalise now so the run still ends.
        send_finalize(app, run_id)
    return result


def _watermark_fields(source: Source, request: ScanRequest, started: datetime) -> dict[str, str]:
    """What finalisation needs to advance the source's watermark once the run ends done: every image of the
    source written before `watermark_to` was then listed. A --limit run lists only part of it: no watermark."""
    name = watermark_name(source, request.suffixes)
    if name is None or request.limit is not None:
        return {}
    return {"watermark_source": name, "watermark_to": (request.until or started).astimezone(UTC).isoformat()}


def _run_fields(request: ScanRequest) -> dict[str, str | int]:
    """The run-hash fields the workers' scripts read: the failure threshold, and who to tell at the end."""
    fields: dict[str, str | int] = {"max_error_rate": repr(float(request.max_error_rate)),
                                    "min_calls": request.min_calls}
    if request.notify_url:
        fields["notify_url"] = request.notify_url
    if request.tags:
        fields["tags"] = json.dumps(dict(request.tags), sort_keys=True)
    return fields


def _iso(when: datetime | None) -> str | None:
    return when.astimezone(UTC).isoformat() if when else None


def _chain(first: Listing, rest: Iterator[Listing]) -> Iterator[Listing]:
    yield first
    yield from rest


@contextmanager
def _publisher(app: Celery) -> Iterator[Callable[[Chunk], None]]:
    """send_chunk through one kombu producer held for the whole scan."""
    with app.producer_or_acquire() as producer:
        yield lambda chunk: send_chunk(app, chunk, producer)


def _unjudged(claims: Claims, bucket: str, page: list[ObjectInfo]) -> list[ObjectInfo]:
    # A row without an ETag (a list file) cannot be looked up: the worker reads its ETag and checks the
    # done-set in the claim script, before any payment.
    known = [o for o in page if o.etag]
    seen = dict(zip((o.key for o in known), claims.judged([Item(bucket, o.key, o.etag).identity for o in known]),
                    strict=True)) if known else {}
    return [o for o in page if not o.etag or seen.get(o.key) is None]
