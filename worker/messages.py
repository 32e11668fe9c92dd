"""Names shared by producer and workers: the queue, the task names, the chunk message (stdlib only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.errors import PermanentInputError

QUEUE = "irlive"
PROCESS_CHUNK = "irlive.process_chunk"
FINALIZE_RUN = "irlive.finalize_run"


@dataclass(frozen=True)
class Chunk:
    """A chunk message: keys only (never tokens or URLs), with the ETag seen when listed."""

    run_id: str
    seq: int
    bucket: str
    items: list[tuple[str, str]]

    @classmethod
    def from_message(cls, body: dict[str, Any]) -> Chunk:
        try:
            items = [(str(k), str(e)) for k, e in body["items"]]
            return cls(str(body["run_id"]), int(body["seq"]), str(body["bucket"]), items)
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentInputError(f"malformed chunk message: {type(exc).__name__}", code="bad_message") from None

    def to_message(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "seq": self.seq, "bucket": self.bucket, "items": [list(i) for i in self.items]}

    def label(self) -> str:
        return f"{self.run_id}/{self.seq}"
