"""The Celery application: broker and delivery settings from Settings; the worker's app adds tasks and lifecycle."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any
from urllib.parse import quote

from celery import Celery
from celery.app.events import Events
from celery.concurrency import get_implementation
from celery.events.dispatcher import EventDispatcher
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    celeryd_init,
    task_postrun,
    task_prerun,
    task_received,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
    worker_shutting_down,
)
from kombu.entity import Queue

from worker.config import SentinelTarget, Settings, is_sentinel_url
from worker.errors import ConfigError, IrliveError
from worker.messages import CONTROL_QUEUE, FINALIZE_RUN, NOTIFY_RUN, PROCESS_CHUNK, QUEUES, Chunk
from worker.ops import kombu_guards, logs, redact

log = logging.getLogger("irlive.app")
_lock = threading.Lock()
_from_env: Celery | None = None


def make_app(settings: Settings) -> Celery:
    """A configured app without tasks: the producer sends tasks by name with it."""
    # Before any connection: a broker failover must not crash the consumer (worker/ops/kombu_guards.py).
    kombu_guards.install()
    broker, sentinel_options = broker_url(settings.redis_url)
    app = Celery("irlive", broker=broker, set_as_current=False, events=_RedactedEvents)
    vt = settings.visibility_timeout
    transport: dict[str, Any] = {
        **sentinel_options,
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
        # Flower (and `celery events`) see tasks only through these events: PUBLISHes on the broker, each dropped
        # at once when nobody listens, so on by default. The worker's heartbeats come with them (no
        # --without-heartbeat): Flower lists a worker as online only while they keep arriving (every 2 s).
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Keep running on a broker hiccup: the work is idempotent and recorded per image, and cancelling
        # would throw away calls already paid for; an ack that cannot be sent means a harmless redelivery.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


class _RedactingDispatcher(EventDispatcher):  # type: ignore[misc]
    """Task events reach Flower as they are: a failure's or a retry's exception text and traceback may quote a
    URL with its password or a token, as log lines may; every text field is redacted the same way first."""

    def send(self, type: str, *args: Any, **fields: Any) -> Any:
        return super().send(type, *args, **_redacted(fields))

    def publish(self, type: str, fields: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return super().publish(type, _redacted(fields), *args, **kwargs)


class _RedactedEvents(Events):  # type: ignore[misc]
    dispatcher_cls = _RedactingDispatcher


def _redacted(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: redact.redact(v) if isinstance(v, str) else v for k, v in fields.items()}


def broker_url(redis_url: str) -> tuple[str, dict[str, Any]]:
    """kombu's broker URL and transport options for IRLIVE_REDIS_URL.

    irlive's one sentinel URL (`sentinel://[:pw@]h1:p1,h2:p2/db?master_name=NAME`, also read by the Store)
    becomes kombu's form: one `sentinel://` URL per sentinel joined by `;`, the master's name and the
    sentinels' own password as transport options.
    """
    if not is_sentinel_url(redis_url):
        return redis_url, {}
    target = SentinelTarget.parse(redis_url)
    auth = ""
    if target.username or target.password:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    broker = ";".join(f"sentinel://{auth}{f'[{host}]' if ':' in host else host}:{port}/{target.db}"
                      for host, port in target.sentinels)
    # As the Store's: a dead sentinel is skipped after seconds, not after the data connection's timeout.
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    return broker, {"master_name": target.master_name, "sentinel_kwargs": sentinel_kwargs}


def send_chunk(app: Celery, chunk: Chunk, producer: Any = None) -> None:
    """Enqueue a chunk on its priority's queue (by task name: the producer needs no task code); `producer` keeps
    one kombu producer for many messages (a scan) instead of taking one from the pool per message.

    argsrepr is short: Celery otherwise renders a safe repr of every key of the message for its headers (half
    of send_task's CPU), and Flower shows this line for the task."""
    app.send_task(PROCESS_CHUNK, args=[chunk.to_message()], queue=chunk.queue, producer=producer,
                  argsrepr=chunk_argsrepr(chunk), kwargsrepr="{}")


def chunk_argsrepr(chunk: Chunk) -> str:
    """What Celery's headers, task events, Flower and task log lines show of a chunk's arguments: which chunk
    and how big, never its keys (a retry re-sends the message, so it sets this too)."""
    return f"[chunk {chunk.label()}: {len(chunk.items)} images]"


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
    # The deliveries this worker's consumer received and its threads have not finished: said to Redis so the
    # watchdog leaves a chunk waiting for a thread alone (worker/ops/holding.py). The consumer is in the main
    # process whatever the pool.
    holding: list[Any] = []

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        _check_extra(settings)
        _check_redis(settings)
        from celery.worker import state as celery_state

        from worker.keys import Keys
        from worker.ops.holding import Holding
        from worker.seams.store import Store

        holding.append(Holding(Store.from_url(settings.redis_url), Keys(settings.key_prefix),
                               forget_after_s=settings.visibility_timeout, tracked=lambda: celery_state.requests))
        holding[0].start()
        # Prefork children build their own after the fork (threads and sockets do not survive it).
        if "prefork" not in getattr(get_implementation(sender.pool_cls), "__module__", ""):
            runtime.threads = getattr(sender, "concurrency", None)
            runtime.start()
        else:
            runtime.serve_pool_metrics()

    def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            runtime.stop()
            for h in holding:
                h.stop()
                h.store.close()

    def on_received(request: Any = None, **_: Any) -> None:
        message = getattr(request, "message", None)
        if holding and message is not None and getattr(request, "name", None) == PROCESS_CHUNK:
            holding[0].received(str(request.id), str(message.delivery_tag))

    def on_shutting_down(**_: Any) -> None:
        # A warm shutdown waits for running chunks: those waiting in line for the seller give up their wait and go
        # back to the queue, so the shutdown takes one call's time, not a queue's. (Prefork children learn of it
        # by their own exit: their Runtime is another process's.)
        runtime.stopping.set()

    def on_process_init(**_: Any) -> None:
        runtime.threads = 1
        runtime.start()

    def on_process_shutdown(**_: Any) -> None:
        runtime.stop()

    def install_redaction(logger: logging.Logger, **_: Any) -> None:
        # The format first: redact.install leaves a JSON formatter unwrapped (it redacts field by field).
        logs.apply(logger, settings.log_format)
        redact.install(logger)
        # httpx logs every request at INFO: a line per call and per payment, at a cost in CPU per image.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logs.quiet_broker_retries()
        # Prefork children log through billiard's multiprocessing logger, which Celery sets up on its own.
        from celery.utils.log import get_multiprocessing_logger

        logs.apply(get_multiprocessing_logger(), settings.log_format)
        redact.install(get_multiprocessing_logger())

    def quiet_banner(instance: Any = None, **_: Any) -> None:
        # Celery prints its startup banner (ASCII art, settings) to stdout past logging: not one JSON event a
        # line. Its facts are in the worker's own log lines and `irlive config`.
        if getattr(instance, "app", None) is app and logs.resolve(settings.log_format) == "json":
            instance.quiet = True

    # The task's log context (run, chunk), from before the task starts to after Celery's own "succeeded",
    # "retry" or "raised" line: prerun and postrun run on the task's thread around all of them.
    contexts: dict[str, Any] = {}

    def on_prerun(task_id: str = "", task: Any = None, args: Any = (), **_: Any) -> None:
        if task_id and getattr(task, "app", None) is app:
            # The task's id and name too: a chunk's calls log from threads of their own, where Celery's current
            # task is not set, and carry this context (copied) instead.
            contexts[task_id] = logs.start(task_id=task_id, task=task.name, **_task_context(task.name, args))

    def on_postrun(task_id: str = "", **_: Any) -> None:
        token = contexts.pop(task_id, None)
        if token is not None:
            logs.leave(token)
        if holding:
            holding[0].finished(task_id)

    task_prerun.connect(on_prerun, weak=False)
    task_postrun.connect(on_postrun, weak=False)
    task_received.connect(on_received, weak=False)
    worker_init.connect(on_worker_init, weak=False)
    worker_shutdown.connect(on_worker_shutdown, weak=False)
    worker_shutting_down.connect(on_shutting_down, weak=False)
    worker_process_init.connect(on_process_init, weak=False)
    worker_process_shutdown.connect(on_process_shutdown, weak=False)
    after_setup_logger.connect(install_redaction, weak=False)
    after_setup_task_logger.connect(install_redaction, weak=False)
    celeryd_init.connect(quiet_banner, weak=False)


def _task_context(name: str, args: Any) -> dict[str, Any]:
    """The log fields a task's arguments name: a chunk's run and sequence number, a run task's run."""
    try:
        if name == PROCESS_CHUNK:
            chunk = Chunk.from_message(args[0])
            return {"run_id": chunk.run_id, "chunk": chunk.seq}
        if name in (FINALIZE_RUN, NOTIFY_RUN):
            return {"run_id": str(args[0])}
    except (IrliveError, IndexError, KeyError, TypeError):
        pass  # a malformed message: the task itself says so
    return {}


def _check_extra(settings: Settings) -> None:
    """Refuse to start without the library the configured way to pay needs (an image built without its extra)."""
    from worker.config import missing_extra

    missing = missing_extra(settings.payment_method)
    if missing:
        print(f"irlive worker: error: {missing}", file=sys.stderr, flush=True)
        raise SystemExit(2)


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
            settings = Settings.from_env()
            # Until Celery sets up its own handlers (after worker_init), lines such as create_app's warning and
            # the Redis durability check would reach stderr through Python's last-resort handler, unformatted.
            logs.configure(settings.log_format)
            logs.say_root_once()
            _from_env = create_app(settings)
        return _from_env
