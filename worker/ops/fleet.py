"""What the running workers enforce on money, written by each at its start into Redis, so that `irlive wallet`
shows the caps the fleet applies rather than the ones in the shell it runs in."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from worker.config import Settings
from worker.keys import Keys
from worker.seams.store import Store

# A worker that died without saying so is forgotten after this (workers say it again at each start).
FORGET_AFTER_S = 7 * 24 * 3600


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def announce(store: Store, keys: Keys, settings: Settings, *, now: float | None = None,
             threads: int | None = None) -> None:
    """This worker's enforced settings (and its threads: calls it can carry at once), under its host and pid;
    entries older than FORGET_AFTER_S go."""
    at = time.time() if now is None else now
    entry = {**settings.enforced_view(), "payment_method": settings.payment_method, "at": round(at),
             "threads": threads}
    store.hset(keys.fleet_enforced(), me(), json.dumps(entry, sort_keys=True))
    for name, raw in store.hgetall(keys.fleet_enforced()).items():
        try:
            stale = at - float(json.loads(raw).get("at", 0)) > FORGET_AFTER_S
        except (ValueError, AttributeError):
            stale = True
        if stale:
            store.hdel(keys.fleet_enforced(), name)


def leave(store: Store, keys: Keys) -> None:
    store.hdel(keys.fleet_enforced(), me())


def enforced(store: Store, keys: Keys) -> list[dict[str, Any]]:
    """Every worker's entry (`worker` is host:pid), newest start first."""
    found = []
    for name, raw in store.hgetall(keys.fleet_enforced()).items():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append({**entry, "worker": name})
    return sorted(found, key=lambda e: -float(e.get("at", 0)))
