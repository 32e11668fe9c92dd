"""The chunk lease: one delivery of a chunk works at a time, kept alive by a heartbeat while it works."""

from __future__ import annotations

import threading
import uuid
from types import TracebackType

from worker.errors import ChunkBusy
from worker.flow.runs import Runs

# Short, because a heartbeat renews it: a killed worker's chunk is free again this soon.
CHUNK_LEASE_S = 15.0


class ChunkLease:
    """`with ChunkLease(...)`: raises ChunkBusy if another delivery holds the chunk; `held` turns False if lost."""

    def __init__(self, runs: Runs, run_id: str, seq: int, ttl_s: float = CHUNK_LEASE_S) -> None:
        self._runs = runs
        self._run_id = run_id
        self._seq = seq
        self._ttl = ttl_s
        self._holder = uuid.uuid4().hex
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id}-{seq}", daemon=True)

    @property
    def held(self) -> bool:
        return not self._lost.is_set()

    def __enter__(self) -> ChunkLease:
        if not self._runs.lease_chunk(self._run_id, self._seq, self._holder, self._ttl):
            raise ChunkBusy(f"chunk {self._run_id}/{self._seq} is being worked on by another delivery")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._runs.release_chunk(self._run_id, self._seq, self._holder)

    def _beat(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                renewed = self._runs.lease_chunk(self._run_id, self._seq, self._holder, self._ttl)
            except Exception:
                # Redis unreachable for a moment: keep trying until the lease would have run out.
                continue
            if not renewed:
                self._lost.set()
                return
