"""irlive worker: the Celery app and the paid-call core; `celery -A worker worker` finds `app` here."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Built on first access, not at import: importing worker.* must not read the environment.
    if name == "app":
        from worker.app import app_from_env

        return app_from_env()
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
