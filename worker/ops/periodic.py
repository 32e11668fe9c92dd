"""Fleet-wide periodic jobs: a daemon thread per worker process; the one holding the job's lease acts."""

from __future__ import annotations

import contextlib
import logging
import threading

from worker.backoff import Backoff
from worker.errors import IrliveError
from worker.flow.leases import Lease
from worker.keys import Keys
from worker.seams.store import Store

log = logging.getLogger("irlive.periodic")


class Periodic(threading.Thread):
    """Calls tick() every interval while this process holds the job's lease; subclasses define tick().

    The lease lives on the Redis clock and is taken, renewed and released by one script each, so two
    processes never both believe they lead. A long tick calls still_leader() between steps: it renews the
    lease, and says to stop if it was lost.
    """

    def __init__(self, name: str, store: Store, keys: Keys, *, interval_s: float, lease_s: float) -> None:
        super().__init__(name=name, daemon=True)
        self.lease = Lease(store, keys.job_lease(name), lease_s)
        self._interval = interval_s
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        with contextlib.suppress(IrliveError):
            self.lease.release()

    def run(self) -> None:
        failures = 0
        # A failing loop backs off (no jitter: each process has one loop of each kind) up to 120 intervals.
        backoff = Backoff(base_s=self._interval, cap_s=self._interval * 120, jitter=False)
        while not self._stop_event.wait(backoff.delay(failures)):
            try:
                if self.holds_lock():
                    self.tick()
                failures = 0
            except IrliveError as exc:
                # Budget, seller, S3 or Redis trouble: the calls themselves report it; back off and try again.
                log.info("%s skipped: %s", self.name, exc)
                failures = min(failures + 1, 7)
            except Exception:
                log.exception("%s failed", self.name)
                failures = min(failures + 1, 7)

    def holds_lock(self) -> bool:
        """Take the job's lease, or keep it if it is already ours."""
        return self.lease.take()

    def still_leader(self) -> bool:
        """Renew the lease in the middle of a long tick; False means another process leads now: stop."""
        return self.lease.renew()

    def tick(self) -> int:
        raise NotImplementedError
