"""Leases on the Redis clock: one chunk delivery at a time (with the image claims it holds), one leader per job."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterable
from types import TracebackType

from worker.errors import ChunkBusy, IrliveError
from worker.keys import Keys
from worker.seams.store import Store

log = logging.getLogger("irlive.leases")
# Short, because a heartbeat renews it: a killed worker's chunk (and its claims) are free again this soon.
CHUNK_LEASE_S = 15.0
# An image claim holds while the lease it was taken under does (claim.lua asks the lease), so a heartbeat renews
# the lease alone; the claims' own expiry is a backstop, renewed every CLAIM_RENEW_BEATS beats.
CLAIM_TTL_S = 20 * CHUNK_LEASE_S
CLAIM_RENEW_BEATS = 20


def new_token() -> str:
    """A holder token that also says who held it (host/pid), for people reading Redis; never contains spaces."""
    host = socket.gethostname().replace(" ", "_")[:40]
    return f"{host}/{os.getpid()}/{uuid.uuid4().hex[:12]}"


class Lease:
    """A key held by one token until it expires; take, renew and release are one script each (atomic)."""

    def __init__(self, store: Store, key: str, ttl_s: float, token: str | None = None) -> None:
        self.key = key
        self.token = token or new_token()
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._take = store.script("flow", "lease_take")
        self._renew = store.script("flow", "lease_renew")
        self._release = store.script("flow", "lease_release")

    def take(self) -> bool:
        """Take the lease, or extend it if this token holds it already."""
        return int(self._take([self.key], [self.token, self._ttl_ms])) == 1

    def renew(self, claims: Iterable[str] = (), claim_ttl_ms: int = 0, slots_key: str = "",
              slots: Iterable[str] = ()) -> bool:
        """Extend the lease, the limiter's in-flight slots given (members of `slots_key`) and the claims given;
        False (and nothing extended) if it was lost."""
        members = list(slots) if slots_key else []
        keys = [self.key, slots_key, *claims] if members else [self.key, *claims]
        return int(self._renew(keys, [self.token, self._ttl_ms, claim_ttl_ms or self._ttl_ms, len(members),
                                      *members])) == 1

    def release(self, claims: Iterable[str] = ()) -> bool:
        """Give it back, with the claims still held under it; False if it had already been lost."""
        return int(self._release([self.key, *claims], [self.token])) == 1


class ChunkLease:
    """`with ChunkLease(...)`: one delivery of a chunk works at a time; a heartbeat renews the lease, and the image
    claims taken under it hold while it does, so a killed worker's chunk and claims come free within CHUNK_LEASE_S.
    The in-flight slots of its calls are renewed with it, so they come free as soon (not a call timeout later).

    Raises ChunkBusy on entry if another delivery holds the chunk; `held` turns False if the lease is lost.
    """

    def __init__(self, store: Store, keys: Keys, run_id: str, seq: int, ttl_s: float = CHUNK_LEASE_S) -> None:
        self._lease = Lease(store, keys.chunk_lease(run_id, seq), ttl_s)
        self._slots_key = keys.ratelimit_slots()
        self._slots: set[str] = set()
        self._label = f"{run_id}/{seq}"
        self._ttl = ttl_s
        self._claims: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{run_id}-{seq}", daemon=True)

    @property
    def key(self) -> str:
        return self._lease.key

    @property
    def token(self) -> str:
        return self._lease.token

    @property
    def claim_ttl_ms(self) -> int:
        """The claims' own expiry: a backstop (a claim holds while this lease does)."""
        return round(max(CLAIM_TTL_S, self._ttl * CLAIM_RENEW_BEATS) * 1000)

    @property
    def ttl_s(self) -> float:
        """How long the lease (and an in-flight slot held under it) outlives a silent heartbeat."""
        return self._ttl

    @property
    def held(self) -> bool:
        return not self._lost.is_set()

    def hold_claims(self, claim_keys: Iterable[str]) -> None:
        """Claims taken under this lease: renewed with it, released with it."""
        with self._lock:
            self._claims.update(claim_keys)

    def drop_claims(self, claim_keys: Iterable[str]) -> None:
        """Claims released by a record (the record script releases them in Redis)."""
        with self._lock:
            self._claims.difference_update(claim_keys)

    def hold_slot(self, member: str) -> None:
        """A call under this lease holds this in-flight slot (taken with a lease of ttl_s): renewed with the lease
        until `drop_slot`."""
        with self._lock:
            self._slots.add(member)

    def drop_slot(self, member: str) -> None:
        with self._lock:
            self._slots.discard(member)

    def _claim_keys(self) -> list[str]:
        with self._lock:
            return sorted(self._claims)

    def __enter__(self) -> ChunkLease:
        if not self._lease.take():
            raise ChunkBusy(f"chunk {self._label} is being worked on by another delivery")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._lease.release(self._claim_keys())
        except IrliveError as err:
            # Redis unreachable: the lease and its claims expire by themselves within the TTL.
            log.warning("chunk %s: lease not released (%s); it expires in %.0fs", self._label, err, self._ttl)

    def _beat(self) -> None:
        beats = 0
        while not self._stop.wait(self._ttl / 3):
            beats += 1
            claims = self._claim_keys() if beats % CLAIM_RENEW_BEATS == 0 else []
            with self._lock:
                slots = sorted(self._slots)
            try:
                renewed = self._lease.renew(claims, self.claim_ttl_ms, self._slots_key, slots)
            except IrliveError:
                # Redis unreachable for a moment: keep trying until the lease would have run out.
                continue
            if not renewed:
                log.warning("chunk %s: lease lost to another delivery", self._label)
                self._lost.set()
                return
