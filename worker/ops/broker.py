"""What the broker holds, read from kombu's Redis layout: waiting chunk messages and delivered-unacked ones.

kombu keeps a delivered message in the `unacked` hash (tag -> [message, exchange, routing key]) with its
delivery time in the `unacked_index` zset until it is acked, and gives it back only after the visibility
timeout (about an hour with irlive's defaults). The watchdog reads these to find deliveries whose worker
died, and hands them back with kombu's own restore (to the head of their queue) as soon as the chunk's
lease has expired.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.messages import FINALIZE_RUN, PROCESS_CHUNK, QUEUES
from worker.seams.store import Store

UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
# A restore function: kombu's QoS.restore_by_tag, through a connection of the app (see worker.app).
Restore = Callable[[str], None]


@dataclass(frozen=True)
class Delivery:
    """One delivered, not yet acked, irlive message."""

    tag: str
    task: str
    args: list[Any]
    delivered_at: float  # the consuming worker's clock, seconds
    eta: float | None  # a deferred task's due time, seconds; None when due at once

    @property
    def chunk(self) -> dict[str, Any] | None:
        if self.task != PROCESS_CHUNK or not self.args or not isinstance(self.args[0], dict):
            return None
        return self.args[0]


class Broker:
    """Reads the broker's Redis keys (never writes them: giving a message back goes through kombu)."""

    def __init__(self, store: Store, queues: tuple[str, ...] = tuple(QUEUES.values()),
                 restore: Restore | None = None) -> None:
        self._store = store
        self._queues = queues
        self._restore = restore

    def queued_chunks(self) -> Iterator[dict[str, Any]]:
        """Chunk messages waiting in the queues."""
        for queue in self._queues:
            for raw in self._store.lrange(queue, 0, -1):
                decoded = decode(raw)
                if decoded is not None and decoded[0] == PROCESS_CHUNK and decoded[1] \
                        and isinstance(decoded[1][0], dict):
                    yield decoded[1][0]

    def depths(self) -> dict[str, int]:
        """Messages waiting per queue."""
        return {queue: int(self._store.llen(queue)) for queue in self._queues}

    def deliveries(self) -> list[Delivery]:
        """irlive messages delivered to a worker and not acked yet."""
        # Both in one transaction: kombu writes (and acks) a delivery to the hash and its index together, and
        # a delivery acked between two separate reads was seen with no time (0: "no lease for 56 years").
        pipe = self._store.pipeline(transaction=True)
        pipe.hgetall(UNACKED)
        pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
        raw, indexed = pipe.execute()
        if not raw:
            return []
        times = dict(indexed)
        found: list[Delivery] = []
        for tag, value in raw.items():
            if tag not in times:
                continue  # being written or acked by kombu right now: the next pass sees it whole
            try:
                message = json.loads(value)[0]
            except (ValueError, IndexError, KeyError, TypeError):
                continue
            decoded = decode_envelope(message)
            if decoded is None or decoded[0] not in (PROCESS_CHUNK, FINALIZE_RUN):
                continue
            task, args, eta = decoded
            found.append(Delivery(tag, task, args, float(times[tag]), eta))
        return found

    def restore(self, tag: str) -> None:
        """Give a delivered message back to the head of its queue now (kombu's restore), as a dead worker would
        have after the visibility timeout."""
        if self._restore is None:
            raise RuntimeError("this Broker was built without a restore function")
        self._restore(tag)


def decode(raw: str | bytes) -> tuple[str, list[Any], float | None] | None:
    """(task name, args, eta) of a kombu message as stored in a Redis list; None if it is not a Celery task."""
    try:
        return decode_envelope(json.loads(raw))
    except ValueError:
        return None


def decode_envelope(envelope: Any) -> tuple[str, list[Any], float | None] | None:
    try:
        headers = envelope.get("headers", {})
        task = headers.get("task")
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        eta = headers.get("eta")
        when = datetime.fromisoformat(eta).timestamp() if isinstance(eta, str) and eta else None
        return (str(task), list(args), when) if isinstance(task, str) and isinstance(args, list) else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
