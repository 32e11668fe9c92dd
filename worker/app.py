"""The Celery application: broker and delivery settings derived from Settings; tasks registered by name."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger

from worker.config import Settings
from worker.ops import redact

QUEUE = "irlive"
log = logging.getLogger("irlive.app")
_lock = threading.Lock()
_from_env: Celery | None = None


def create_app(settings: Settings) -> Celery:
    """A configured app; the producer uses it to send tasks by name, workers to run them."""
    from worker.flow.tasks import register_tasks

    app = Celery("irlive", broker=settings.redis_url, set_as_current=False)
    vt = settings.visibility_timeout
    if vt < 2 * settings.worst_chunk_s:
        # Allowed (tests want fast redelivery), but a slow chunk may then run twice; the chunk lease makes
        # the second delivery wait instead of paying, so it costs time, not money.
        log.warning("IRLIVE_VISIBILITY_TIMEOUT_S=%s is under twice the worst chunk time (%.0fs)", vt,
                    settings.worst_chunk_s)
    transport = {
        "visibility_timeout": vt,
        # kombu scans for unacked messages every interval*throttle seconds; keep it well under vt.
        "unacked_restore_interval": max(1, min(10, vt // 10)),
        "unacked_restore_throttle": 1,
    }
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        broker_transport_options=transport,
        visibility_timeout=vt,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        # Keep running on a broker hiccup: the work is idempotent and recorded per image, and cancelling
        # would throw away calls already paid for; an ack that cannot be sent means a harmless redelivery.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    register_tasks(app, settings)
    return app


def app_from_env() -> Celery:
    """The app `celery -A worker` runs: settings are read here, once per process."""
    global _from_env
    with _lock:
        if _from_env is None:
            _from_env = create_app(Settings.from_env())
        return _from_env


def _install_redaction(logger: logging.Logger, **_: Any) -> None:
    redact.install(logger)


after_setup_logger.connect(_install_redaction, weak=False)
after_setup_task_logger.connect(_install_redaction, weak=False)
