"""The Celery application: broker and delivery settings from Settings; the worker's app adds tasks and lifecycle."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from celery import Celery
from celery.concurrency import get_implementation
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)
from kombu.entity import Queue

from worker.config import Settings
from worker.errors import ConfigError, IrliveError
from worker.messages import CONTROL_QUEUE, FINALIZE_RUN, PROCESS_CHUNK, QUEUES, Chunk
from worker.ops import redact

log = logging.getLogger("irlive.app")
_lock = threading.Lock()
_from_env: Celery | None = None


def make_app(settings: Settings) -> Celery:
    """A configured app without tasks: the producer sends tasks by name with it."""
    app = Celery("irlive", broker=settings.redis_url, set_as_current=False)
    vt = settings.visibility_timeout
    transport = {
        "visibility_timeout": vt,
        # kombu scans for unacked messages every interval*throttle seconds; keep it well under vt.
        "unacked_restore_interval": max(1, min(10, vt // 10)),
        "unacked_restore_throttle": 1,
        # Fetch from the queues in their listed order: events before nightly scans before backfills.
        "queue_order_strategy": "priority",
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(name, routing_key=name) for name in QUEUES.values()],  # type: ignore[no-untyped-call]
        task_default_queue=QUEUES["nightly"],
        task_routes={FINALIZE_RUN: {"queue": CONTROL_QUEUE}},
        broker_transport_options=transport,
        visibility_timeout=vt,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        # Keep running on a broker hiccup: the work is idempotent and recorded per image, and cancelling
        # would throw away calls already paid for; an ack that cannot be sent means a harmless redelivery.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def send_chunk(app: Celery, chunk: Chunk, producer: Any = None) -> None:
    """Enqueue a chunk on its priority's queue (by task name: the producer needs no task code); `producer` keeps
    one kombu producer for many messages (a scan) instead of taking one from the pool per message.

    argsrepr is short: Celery otherwise renders a safe repr of every key of the message for its headers (half
    of send_task's CPU), and Flower shows this line for the task."""
    app.send_task(PROCESS_CHUNK, args=[chunk.to_message()], queue=chunk.queue, producer=producer,
                  argsrepr=f"[chunk {chunk.label()}: {len(chunk.items)} images]", kwargsrepr="{}")


def send_finalize(app: Celery, run_id: str) -> None:
    app.send_task(FINALIZE_RUN, args=[run_id], queue=CONTROL_QUEUE)


def create_app(settings: Settings) -> Celery:
    """The worker's app: tasks registered by name, clients and threads built and closed with the process."""
    from worker.flow.tasks import register_tasks
    from worker.ops.runtime import Runtime

    app = make_app(settings)
    if settings.visibility_timeout < 2 * settings.worst_chunk_s:
        # Allowed, but a slow chunk may then be delivered twice; the chunk lease makes the second delivery
        # wait instead of paying, so it costs time, not money.
        log.warning("IRLIVE_VISIBILITY_TIMEOUT_S=%s is under twice the worst chunk time (%.0fs)",
                    settings.visibility_timeout, settings.worst_chunk_s)

    def send(name: str, args: list[Any]) -> None:
        if name == PROCESS_CHUNK:
            send_chunk(app, Chunk.from_message(args[0]))
        else:
            app.send_task(name, args=args)

    def restore(tag: str) -> None:
        with app.connection_for_write() as conn:
            conn.default_channel.qos.restore_by_tag(tag)

    runtime = Runtime(settings, send, restore)
    register_tasks(app, runtime)
    _connect_lifecycle(app, settings, runtime)
    return app


def _connect_lifecycle(app: Celery, settings: Settings, runtime: Any) -> None:
    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        _check_redis(settings)
        # Prefork children build their own after the fork (threads and sockets do not survive it).
        if "prefork" not in getattr(get_implementation(sender.pool_cls), "__module__", ""):
            runtime.start()
        else:
            runtime.serve_pool_metrics()

    def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            runtime.stop()

    def on_process_init(**_: Any) -> None:
        runtime.start()

    def on_process_shutdown(**_: Any) -> None:
        runtime.stop()

    def install_redaction(logger: logging.Logger, **_: Any) -> None:
        redact.install(logger)
        # httpx logs every request at INFO: a line per call and per payment, at a cost in CPU per image.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # Prefork children log through billiard's multiprocessing logger, which Celery sets up on its own.
        from celery.utils.log import get_multiprocessing_logger

        redact.install(get_multiprocessing_logger())

    worker_init.connect(on_worker_init, weak=False)
    worker_shutdown.connect(on_worker_shutdown, weak=False)
    worker_process_init.connect(on_process_init, weak=False)
    worker_process_shutdown.connect(on_process_shutdown, weak=False)
    after_setup_logger.connect(install_redaction, weak=False)
    after_setup_task_logger.connect(install_redaction, weak=False)


def _check_redis(settings: Settings) -> None:
    """Refuse to start on a Redis that would forget money (see worker.ops.durability)."""
    from worker.ops.durability import require_durable
    from worker.seams.store import Store

    store = Store.from_url(settings.redis_url, socket_timeout=10)
    try:
        found = require_durable(store, allow_volatile=settings.allow_volatile_redis, where=store.where)
    except ConfigError as exc:
        print(f"irlive worker: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except IrliveError as exc:
        # Unreachable now: Celery waits for the broker; the check runs again at the next start.
        log.warning("Redis durability not checked: %s", exc)
        return
    finally:
        store.close()
    if not found.checked:
        log.warning("Redis durability not checked: %s", found.why_unchecked)
    elif found.problems():
        log.warning("Redis is volatile (%s), accepted by IRLIVE_ALLOW_VOLATILE_REDIS", "; ".join(found.problems()))


def app_from_env() -> Celery:
    """The app `celery -A worker` runs: settings are read here, once per process."""
    global _from_env
    with _lock:
        if _from_env is None:
            _from_env = create_app(Settings.from_env())
        return _from_env
