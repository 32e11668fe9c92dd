"""Two guards on kombu's Redis transport that keep a worker alive through a broker failover (kombu 5.7.0).

When the broker's master dies while a worker has a task unacked (acks_late) and a BRPOP outstanding, and the
remote-control socket reports the loss first, Celery's reconnect handler closes the task channel twice:

1. `Connection.collect()` closes it while its BRPOP is pending; draining that read fails on the dead socket and
   `Channel.close` only catches `Empty`, so the channel is left half-closed (pools kept, not marked closed);
   `collect()` then sets the transport's `client` to None.
2. `Connection.close()` closes it again: restoring the unacked message rebuilds a pool through
   `Channel._connparams`, which reads `self.connection.client.hostname` -> AttributeError. That is not a
   connection error, so Celery logs "Unrecoverable error" and the worker exits (and "Error on stopping Hub"
   when the acks queued by the pool's threads meet the same None).

Guard 1 makes a channel whose connection is gone raise a `ConnectionError` (an OSError, one of the transport's
connection errors) from `_connparams`, which every caller (kombu's `ignore_errors`, `Message.ack_log_error`,
Celery's consumer restart) treats as recoverable.
Guard 2 lets `close()` go on when draining the pending BRPOP fails with a connection error, so the first close
completes while the transport is alive and the later acks reach the new master. No upstream fix exists in the
releases the lock allows (kombu 5.7.0 is the newest; celery/kombu#582 is the same AttributeError from another
path); `tests/test_kombu_guards.py` replays the failover with kombu alone and shows it unguarded, so an upgrade
that fixes it says so.
"""

from __future__ import annotations

from queue import Empty
from typing import Any

# The kombu release these guards were written against and tested with; install() refuses nothing on another
# release (the guards only act where kombu would raise AttributeError), but the test says when to re-check.
GUARDED_KOMBU = "5.7.0"
_MARK = "_irlive_guard"


def install() -> bool:
    """Guard kombu's Redis channels (idempotent); True if this call installed the guards."""
    from kombu.transport import redis as kombu_redis

    channel: Any = kombu_redis.Channel  # SentinelChannel inherits both methods
    if getattr(channel._connparams, _MARK, False):
        return False
    connparams = channel._connparams
    close = channel.close

    def guarded_connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            raise ConnectionError("the broker channel's connection was released (reconnecting)")
        return connparams(self, asynchronous=asynchronous)

    def guarded_close(self: Any) -> Any:
        if self._in_poll and not self.closed:
            try:
                self._brpop_read()  # clears _in_poll and drops the dead socket, whatever it raises
            except Empty:
                pass
            except self.connection_errors:
                pass
        return close(self)

    for guard, original in ((guarded_connparams, connparams), (guarded_close, close)):
        setattr(guard, _MARK, True)
        guard.__wrapped__ = original  # type: ignore[attr-defined]  # what a test unguards to
    channel._connparams = guarded_connparams
    channel.close = guarded_close
    return True


def installed() -> bool:
    from kombu.transport import redis as kombu_redis

    return bool(getattr(kombu_redis.Channel._connparams, _MARK, False))
