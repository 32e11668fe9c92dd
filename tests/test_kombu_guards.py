"""kombu's Redis transport through a broker failover, replayed with kombu alone on a real Sentinel group.

What Celery's consumer does when the master dies with a task unacked (acks_late) and a BRPOP outstanding, and
the remote-control socket reports the loss first: `collect()`, then `close()` of the connection, then the ack
of the running task. Unguarded, kombu 5.7.0 raises AttributeError there and the worker exits ("Unrecoverable
error"); worker/ops/kombu_guards.py turns it into connection errors Celery recovers from. The unguarded replay
is kept so that a kombu release that fixes the crash says so (and the guards can go).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.common import ignore_errors
from kombu.pidbox import Mailbox
from kombu.transport import redis as kombu_redis

from sandbox.procs import wait_until
from tests.sentinel import SentinelGroup
from worker.app import broker_url
from worker.ops import kombu_guards

pytestmark = pytest.mark.integration


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    with SentinelGroup(tmp_path) as g:
        yield g


def _replay_failover(group: SentinelGroup) -> list[BaseException]:
    """Returns what escaped the steps Celery's reconnect handler takes (nothing, if it recovers)."""
    url, options = broker_url(group.url)
    queue = Queue("guards", Exchange("guards"), "guards")
    with Connection(url, transport_options=options) as producer:
        Producer(producer).publish({"x": 1}, exchange=queue.exchange, routing_key="guards", declare=[queue])
    conn = Connection(url, transport_options=options)
    escaped: list[BaseException] = []
    try:
        conn.ensure_connection(max_retries=3)
        got: list[Any] = []
        consumer = Consumer(conn.default_channel, [queue], callbacks=[lambda body, message: got.append(message)])
        consumer.qos(prefetch_count=1)
        consumer.consume()
        # Celery's remote control: a broadcast queue on a channel of its own.
        Mailbox("celery", type="fanout", accept=["json"]).Node("guards@test", channel=conn.channel()).listen(
            callback=lambda *_: None)

        def delivered() -> bool:
            with contextlib.suppress(socket.timeout):  # nothing yet: poll again
                conn.drain_events(timeout=0.5)
            return bool(got)

        wait_until(delivered, 10, "the message to be delivered")
        message = got[0]  # unacked, as a running acks_late task's
        channel = message.channel
        if not channel._in_poll:
            channel._brpop_start()  # a free prefetch slot: a BRPOP is on the wire
        assert channel._in_poll and channel.qos._delivered
        group.kill_master()
        for step in (lambda: conn.collect(socket_timeout=1.0), lambda: ignore_errors(conn, conn.close),
                     lambda: message.ack_log_error(logging.getLogger("guards"), conn.connection_errors)):
            try:
                step()
            except Exception as exc:  # what escapes is what the test reports
                escaped.append(exc)
    finally:
        ignore_errors(conn, conn.release)
    return escaped


def test_a_guarded_channel_recovers_from_a_failover_with_a_task_unacked(group: SentinelGroup) -> None:
    kombu_guards.install()
    assert kombu_guards.installed()
    escaped = _replay_failover(group)
    assert not [e for e in escaped if isinstance(e, AttributeError)], escaped
    assert escaped == [], f"kombu's recoverable errors are caught by its callers; escaped: {escaped!r}"


def test_unguarded_kombu_still_crashes_there(group: SentinelGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    """If this fails, the kombu in the lock no longer crashes: remove worker/ops/kombu_guards.py."""
    channel: Any = kombu_redis.Channel
    for name in ("_connparams", "close"):
        method = getattr(channel, name)
        monkeypatch.setattr(channel, name, getattr(method, "__wrapped__", method))
    assert not kombu_guards.installed()
    escaped = _replay_failover(group)
    assert any(isinstance(e, AttributeError) for e in escaped), (
        f"kombu {kombu_guards.GUARDED_KOMBU}'s failover crash did not happen: {escaped!r}")
