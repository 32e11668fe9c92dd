"""Which unacked deliveries each live worker process holds: the watchdog's proof of life for a delivery with no
chunk lease yet.

A chunk lease is taken when a thread starts the chunk. Before that (a message waiting for a free thread, a
deferred chunk come due while every thread is busy) the delivery belongs to its process only in that process's
memory, and the watchdog, seeing no lease 10 s after the delivery, took it for a dead worker's and handed it
back: 3 to 34 times a run at 35 calls/s and more, each chunk then worked twice (claims kept it from being paid
twice). Each worker process now says, every REFRESH_S, which delivery tags it holds, in a key that expires TTL_S
later on the Redis clock: a live process's deliveries are left alone, and a dead one's are handed back once its
key is gone, as before. Hand-written: it is one key per process and one set, read by one function.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Container

from worker.errors import IrliveError
from worker.keys import Keys
from worker.seams.store import Store

log = logging.getLogger("irlive.holding")
REFRESH_S = 5.0
# Three refreshes: a process is taken for dead 10-15 s after its last word, about when its chunk leases lapse.
TTL_S = 15.0


def process_name() -> str:
    """host/pid, as chunk leases name their holder."""
    return f"{socket.gethostname()}/{os.getpid()}"


class Holding(threading.Thread):
    """This process's deliveries received and not yet finished, said to Redis every REFRESH_S."""

    def __init__(self, store: Store, keys: Keys, *, forget_after_s: float, process: str | None = None,
                 tracked: Callable[[], Container[str]] | None = None) -> None:
        super().__init__(name="holding", daemon=True)
        self.store = store
        self._keys = keys
        self._process = process or process_name()
        # The task ids the worker still tracks (Celery's worker state). On a broker connection loss Celery drops
        # every request not running (waiting for a thread, or for a retry's countdown): their delivery tags
        # belong to the lost channel and the broker must give them out again. A tag still said after that held
        # its chunk off the watchdog until the visibility timeout (~3 hours; a run left one chunk short by a failover).
        self._tracked = tracked
        # A task's end is not seen here under prefork (it ends in a child): a tag is also forgotten once the
        # broker would redeliver it anyway (its visibility timeout), and an acked tag is simply never asked about.
        self._forget_after_s = forget_after_s
        self._tags: dict[str, tuple[str, float]] = {}  # task id -> (delivery tag, monotonic time received)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()

    def received(self, task_id: str, tag: str) -> None:
        with self._lock:
            self._tags[task_id] = (tag, time.monotonic())

    def finished(self, task_id: str) -> None:
        with self._lock:
            self._tags.pop(task_id, None)

    def tags(self) -> list[str]:
        now = time.monotonic()
        tracked = self._tracked() if self._tracked is not None else None
        with self._lock:
            for task_id, (_, at) in list(self._tags.items()):
                # A tag received an instant ago may not be tracked yet: kept until the next word, a refresh away.
                dropped = tracked is not None and task_id not in tracked and now - at > REFRESH_S
                if dropped or now - at > self._forget_after_s:
                    del self._tags[task_id]
            return sorted(tag for tag, _ in self._tags.values())

    def say(self) -> None:
        """Write this process's tags (an empty list too: the process is alive) with their expiry."""
        pipe = self.store.pipeline(transaction=False)
        pipe.set(self._keys.holding(self._process), json.dumps(self.tags()), px=int(TTL_S * 1000))
        pipe.sadd(self._keys.holders(), self._process)
        pipe.execute()

    def run(self) -> None:
        while not self._stop_event.wait(REFRESH_S):
            try:
                self.say()
            except IrliveError as exc:
                log.info("holding not said: %s", exc)

    def start(self) -> None:
        try:
            self.say()
        except IrliveError as exc:
            log.info("holding not said: %s", exc)
        super().start()

    def stop(self) -> None:
        """A clean stop: the process's word is taken back at once (the broker restores its unacked messages)."""
        self._stop_event.set()
        try:
            pipe = self.store.pipeline(transaction=False)
            pipe.delete(self._keys.holding(self._process))
            pipe.srem(self._keys.holders(), self._process)
            pipe.execute()
        except IrliveError as exc:
            log.info("holding not taken back: %s", exc)


def held(store: Store, keys: Keys) -> set[str]:
    """The delivery tags live worker processes say they hold; the word of a process gone quiet is dropped."""
    processes = sorted(store.smembers(keys.holders()))
    if not processes:
        return set()
    said = store.mget([keys.holding(p) for p in processes])
    tags: set[str] = set()
    gone = []
    for process, value in zip(processes, said, strict=True):
        if value is None:
            gone.append(process)
            continue
        try:
            tags.update(str(t) for t in json.loads(value))
        except (ValueError, TypeError):
            continue
    if gone:
        store.srem(keys.holders(), *gone)
    return tags
