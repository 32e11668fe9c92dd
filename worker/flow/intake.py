"""Event intake: images that S3 events announce, buffered in Redis per time-window run and per bucket, coalesced
into chunks of full calls (or sent alone once the oldest has waited long enough), across any number of
listeners; the watchdog flushes and closes windows too, so nothing waits on one process."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.config import Settings
from worker.flow.runs import LISTING_HOLD, now_iso
from worker.flow.states import RunState
from worker.judge.manifest import Item
from worker.keys import Keys
from worker.messages import Chunk
from worker.seams.store import Store

# A closed window's run is released this long after its end plus the longest wait: late events still land.
CLOSE_GRACE_S = 10.0


@dataclass(frozen=True)
class EventObject:
    """One object an event said was created."""

    bucket: str
    key: str
    etag: str

    @property
    def identity(self) -> str:
        return Item(self.bucket, self.key, self.etag).identity


@dataclass(frozen=True)
class Window:
    """The run that collects one time window's events."""

    run_id: str
    end_ms: int


class Intake:
    """Buffering and coalescing; every write is one script (flow/scripts/intake_*.lua)."""

    def __init__(self, store: Store, keys: Keys, settings: Settings) -> None:
        self._store = store
        self._keys = keys
        self._window_s = settings.event_run_window
        self._max_wait_ms = round(settings.event_max_wait_s * 1000)
        self._per_call = settings.images_per_call
        self._chunk_size = max(settings.images_per_call, settings.chunk_size - settings.chunk_size
                               % settings.images_per_call)
        self._settings = settings
        self._open = store.script("flow", "intake_open")
        self._add = store.script("flow", "intake_add")
        self._flush = store.script("flow", "intake_flush")
        self._close = store.script("flow", "intake_close")
        self._opened: set[str] = set()

    def window(self, now_s: float) -> Window:
        start = int(now_s // self._window_s * self._window_s)
        fmt = "%Y%m%dT%H" if self._window_s % 3600 == 0 else "%Y%m%dT%H%M"
        return Window("ev-" + datetime.fromtimestamp(start, UTC).strftime(fmt), (start + self._window_s) * 1000)

    def open(self, window: Window, *, source: str, output: str) -> None:
        """Create the window's run if no listener has yet (idempotent)."""
        if window.run_id in self._opened:
            return
        settings = {**self._settings.producer_view(), "force": False, "priority": "events", "source": source}
        fields: dict[str, str | int] = {
            "run_id": window.run_id, "state": RunState.LISTING, "kind": "events", "source": source,
            "output": output, "created_at": now_iso(), "created_ms": int(time.time() * 1000),
            "window_end_ms": window.end_ms, "total": 0, "chunks": 0, "pending": LISTING_HOLD, "skipped": 0,
            "done": 0, "calls": 0, "spend_cents": 0, "committed_cents": 0, "tokens_bought": 0, "budget_cents": "",
            "buffered": 0, "settings": json.dumps(settings, sort_keys=True),
        }
        args: list[str | int | float] = [window.run_id, time.time()]
        for name, value in fields.items():
            args += [name, value]
        self._open([self._keys.run(window.run_id), self._keys.runs()], args)
        self._opened.add(window.run_id)

    def add(self, objects: Iterable[EventObject], *, source: str, output: str, now_s: float | None = None
            ) -> tuple[int, int]:
        """Buffer objects in the current window's run; returns (buffered, already in the run).

        A window that just closed (another process closed it between our clock and theirs) sends the images to
        the next one. ValueError if the current window's run cannot take images (it failed).
        """
        now_s = time.time() if now_s is None else now_s
        by_bucket: dict[str, list[EventObject]] = defaultdict(list)
        for obj in objects:
            by_bucket[obj.bucket].append(obj)
        added = repeated = 0
        for bucket, group in by_bucket.items():
            for attempt in range(2):
                window = self.window(now_s + attempt * self._window_s)
                self.open(window, source=source, output=output)
                args: list[str | int] = [f"{window.run_id}|{bucket}", int(now_s * 1000)]
                for obj in group:
                    args += [obj.identity, json.dumps([obj.key, obj.etag])]
                n = int(self._add([self._keys.event_buffer(window.run_id, bucket), self._keys.event_buffers(),
                                   self._keys.run_seen(window.run_id), self._keys.run(window.run_id)], args))
                if n >= 0:
                    added += n
                    repeated += len(group) - n
                    break
            else:
                raise ValueError(f"event run {window.run_id} takes no more images (it failed or closed)")
        return added, repeated

    def flush(self, now_s: float | None = None) -> list[Chunk]:
        """Every chunk due: a full call's worth waiting in a buffer, or its oldest image waited long enough."""
        now_ms = int((time.time() if now_s is None else now_s) * 1000)
        chunks: list[Chunk] = []
        for member in self._store.zrange(self._keys.event_buffers(), 0, -1):
            run_id, _, bucket = str(member).rpartition("|")
            while True:
                got = self._flush(
                    [self._keys.event_buffer(run_id, bucket), self._keys.event_buffers(), self._keys.run(run_id),
                     self._keys.chunk_items(run_id)],
                    [member, now_ms, self._max_wait_ms, self._per_call, self._chunk_size, json.dumps(bucket)])
                if not got:
                    break
                items = [(str(k), str(e)) for k, e in json.loads(got[1])]
                chunks.append(Chunk(run_id, int(got[0]), bucket, items, "events"))
        return chunks

    def close_windows(self, now_s: float | None = None) -> list[str]:
        """Release the hold of every event run whose window is over and whose buffers are empty; returns those
        with no chunk pending (to finalise now)."""
        now_s = time.time() if now_s is None else now_s
        due: list[str] = []
        horizon_ms = (now_s - CLOSE_GRACE_S) * 1000 - self._max_wait_ms
        for run_id in self._store.zrangebyscore(self._keys.runs(), now_s - 8 * 24 * 3600, "+inf"):
            if not str(run_id).startswith("ev-"):
                continue
            state, end = self._store.hmget(self._keys.run(run_id), ["state", "window_end_ms"])
            if state != RunState.LISTING or not end or int(end) > horizon_ms:
                continue
            pending = int(self._close([self._keys.run(run_id)], [LISTING_HOLD]))
            if pending == 0:
                due.append(run_id)
        return due
