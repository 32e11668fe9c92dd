"""A scan: list a prefix, filter, deduplicate against the done-set, create the run, enqueue chunks by name."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from producer.chunking import chunked
from producer.filters import image_objects
from worker.config import S3Location, Settings
from worker.manifest import Item
from worker.pipeline import Chunk
from worker.runs import Runs
from worker.storage import ObjectInfo, Storage
from worker.tasks import FINALIZE_RUN, PROCESS_CHUNK


@dataclass(frozen=True)
class ScanRequest:
    """What the user asked for."""

    source: S3Location
    suffixes: tuple[str, ...]
    limit: int | None = None
    force: bool = False


@dataclass
class ScanResult:
    """What a scan did (or, dry, would do)."""

    run_id: str | None
    found: int = 0
    skipped: int = 0
    enqueued: int = 0
    chunks: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "found": self.found, "already_judged": self.skipped,
                "enqueued": self.enqueued, "chunks": self.chunks, **self.extra}


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


def scan(settings: Settings, storage: Storage, runs: Runs, app: Celery, request: ScanRequest,
         output: S3Location, on_progress: Callable[[ScanResult], None] | None = None) -> ScanResult:
    """Create a run and enqueue its chunks while listing; memory stays one chunk deep."""
    storage.check_bucket(request.source.bucket)
    storage.check_bucket(output.bucket)
    run_id = new_run_id()
    runs.create(run_id, source=str(request.source), output=str(output),
                settings={**settings.public_view(), "force": request.force, "suffixes": list(request.suffixes)})
    result = ScanResult(run_id)
    for page in chunked(list_images(storage, request, output), settings.chunk_size):
        result.found += len(page)
        fresh = page if request.force else _unjudged(runs, request.source.bucket, page)
        result.skipped += len(page) - len(fresh)
        runs.add_skipped(run_id, len(page) - len(fresh))
        if fresh:
            seq = runs.add_chunk(run_id, len(fresh))
            chunk = Chunk(run_id, seq, request.source.bucket, [(o.key, o.etag) for o in fresh])
            app.send_task(PROCESS_CHUNK, args=[chunk.to_message()])
            result.enqueued += len(fresh)
            result.chunks += 1
        if on_progress:
            on_progress(result)
    if runs.listing_finished(run_id) == 0:
        # Nothing was enqueued (or everything finished already): finalise now so the run still ends.
        app.send_task(FINALIZE_RUN, args=[run_id])
    return result


def _unjudged(runs: Runs, bucket: str, page: list[ObjectInfo]) -> list[ObjectInfo]:
    seen = runs.already_judged([Item(bucket, o.key, o.etag).identity for o in page])
    return [o for o, s in zip(page, seen, strict=True) if s is None]
