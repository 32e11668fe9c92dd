"""Fleet-wide periodic jobs: a daemon thread per worker process, one of which (a Redis lock) acts at a time."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from worker.errors import IrliveError

log = logging.getLogger("irlive.periodic")


class Periodic(threading.Thread):
    """Calls tick() every interval while this process holds `lock_key`; subclasses define tick()."""

    def __init__(self, name: str, redis: Any, lock_key: str, interval_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self._redis_lock = redis
        self._lock_key = lock_key
        self._interval = interval_s
        self._me = uuid.uuid4().hex
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            try:
                if self.holds_lock():
                    self.tick()
            except IrliveError as exc:
                # Budget, seller or S3 trouble: the calls themselves report it; try again next time.
                log.info("%s skipped: %s", self.name, exc)
            except Exception:
                log.exception("%s failed", self.name)

    def holds_lock(self) -> bool:
        """Take the lock, or keep it if it is already ours; it lapses two intervals after its holder dies."""
        ttl_ms = max(1000, int(self._interval * 2000))
        if self._redis_lock.set(self._lock_key, self._me, nx=True, px=ttl_ms):
            return True
        if self._redis_lock.get(self._lock_key) == self._me:
            self._redis_lock.pexpire(self._lock_key, ttl_ms)
            return True
        return False

    def tick(self) -> int:
        raise NotImplementedError
