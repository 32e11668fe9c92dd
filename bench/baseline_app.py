"""The Celery baseline: irlive's chunk task under Celery's per-task rate_limit, irlive's global limiter switched off."""

from __future__ import annotations

import os

from bench.common import NEUTRAL_RATE, RATE_ENV
from worker.app import create_app
from worker.config import Settings
from worker.errors import ConfigError
from worker.messages import PROCESS_CHUNK


def _celery_rate() -> float:
    raw = os.environ.get(RATE_ENV, "")
    try:
        rate = float(raw)
    except ValueError:
        raise ConfigError(f"{RATE_ENV}={raw!r} is not a number of calls per second") from None
    if rate <= 0:
        raise ConfigError(f"{RATE_ENV}={raw!r} must be above 0")
    return rate


settings = Settings.from_env()
if settings.rate_adaptive or settings.rate_limit_per_s < NEUTRAL_RATE:
    raise ConfigError("the baseline needs irlive's limiter neutralised: "
                      f"IRLIVE_RATE_LIMIT_PER_S={NEUTRAL_RATE:.0f} and IRLIVE_RATE_ADAPTIVE=false")
app = create_app(settings)
app.conf.task_annotations = {PROCESS_CHUNK: {"rate_limit": f"{_celery_rate():g}/s"}}
