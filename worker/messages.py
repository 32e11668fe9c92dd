"""Names shared by producer and workers: the queue, the task names, the chunk message (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.errors import PermanentInputError

# Workers consume these in this order, strictly: an arriving capture's chunk is never stuck behind a backfill.
QUEUES = {"events": "irlive.events", "nightly": "irlive.nightly", "backfill": "irlive.backfill"}
PRIORITIES = tuple(QUEUES)
DEFAULT_PRIORITY = "nightly"
# Finalisations are short and end a run: they go first.
CONTROL_QUEUE = QUEUES["events"]
PROCESS_CHUNK = "irlive.process_chunk"
FINALIZE_RUN = "irlive.finalize_run"
NOTIFY_RUN = "irlive.notify_run"


def queue_for(priority: str) -> str:
    """The queue of a priority (events, nightly, backfill); ValueError for anything else."""
    try:
        return QUEUES[priority]
    except KeyError:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, not {priority!r}") from None


@dataclass(frozen=True)
class Chunk:
    """A chunk message: keys only (never tokens or URLs), with the ETag seen when listed."""

    run_id: str
    seq: int
    bucket: str
    items: list[tuple[str, str]]
    # Which queue the chunk (and any re-send of it) goes to: events, nightly or backfill.
    priority: str = DEFAULT_PRIORITY

    @classmethod
    def from_message(cls, body: dict[str, Any]) -> Chunk:
        try:
            items = [(str(k), str(e)) for k, e in body["items"]]
            priority = str(body.get("priority") or DEFAULT_PRIORITY)
            queue_for(priority)
            return cls(str(body["run_id"]), int(body["seq"]), str(body["bucket"]), items, priority)
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentInputError(f"malformed chunk message: {type(exc).__name__}", code="bad_message") from None

    def to_message(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "seq": self.seq, "bucket": self.bucket, "items": [list(i) for i in self.items],
                "priority": self.priority}

    @property
    def queue(self) -> str:
        return queue_for(self.priority)

    def label(self) -> str:
        return f"{self.run_id}/{self.seq}"
