"""Log lines as JSON or text (IRLIVE_LOG_FORMAT), with the run/chunk context of a task and every field redacted."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from celery._state import get_current_task
from pythonjsonlogger.json import JsonFormatter

from worker.ops import redact

FORMATS = ("auto", "json", "text")
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"
# A field whose name says it holds a credential is masked whole: its value need not look like one.
_SECRET_NAME = re.compile(r"(?i)token|api[_-]?key|authori[sz]ation|password|passwd|secret|signature|credential"
                          r"|cookie")
# Celery's own task lines (celery.app.trace) say what happened to a task in their format string.
_CELERY_OUTCOMES = (("succeeded in", "succeeded"), ("retry:", "retry"), ("raised unexpected", "failed"),
                    ("raised expected", "failed"), ("INTERNAL ERROR", "failed"), ("ignored", "ignored"),
                    ("rejected", "rejected"))
_MAX_DEPTH = 16

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_context: ContextVar[Mapping[str, Any]] = ContextVar("irlive_log_context", default=_EMPTY)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Every line logged on this thread (or task) inside the block carries these fields (None ones dropped)."""
    token = enter(**fields)
    try:
        yield
    finally:
        leave(token)


def enter(**fields: Any) -> Token[Mapping[str, Any]]:
    """log_context's first half, for code that sets and clears in two calls (Celery's prerun/postrun)."""
    merged = {**_context.get(), **{k: v for k, v in fields.items() if v is not None}}
    return _context.set(MappingProxyType(merged))


def leave(token: Token[Mapping[str, Any]]) -> None:
    try:
        _context.reset(token)
    except ValueError:
        # Set in another context (a signal that ran elsewhere): clear rather than leak into the next task.
        _context.set(_EMPTY)


def start(**fields: Any) -> Token[Mapping[str, Any]]:
    """Like enter, but only these fields: a task on a pooled thread must not inherit a previous task's run."""
    return _context.set(MappingProxyType({k: v for k, v in fields.items() if v is not None}))


def current_context() -> dict[str, Any]:
    return dict(_context.get())


def resolve(fmt: str, stream: TextIO | None = None) -> str:
    """"json" or "text": auto is text for a person at a terminal, JSON for whatever collects the lines."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    target = sys.__stderr__ if stream is None else stream
    try:
        return "text" if target is not None and target.isatty() else "json"
    except (AttributeError, ValueError):  # closed or stream-less
        return "json"


def scrub(value: Any, depth: int = 0) -> Any:
    """A log field's value made safe: strings redacted, containers walked, anything else turned into its
    redacted text here (so the JSON encoder never prints an unredacted str() of it later)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return redact.redact(value)
    if depth >= _MAX_DEPTH:
        return "(too deep to log)"
    if isinstance(value, Mapping):
        return {redact.redact(str(k)): "***" if _SECRET_NAME.search(str(k)) and v not in (None, "")
                else scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [scrub(v, depth + 1) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    try:
        text = str(value)
    except Exception:
        text = f"(unprintable {type(value).__name__})"
    return redact.redact(text)


class _Json(JsonFormatter):
    """python-json-logger's formatter with irlive's fields (the task's run and chunk, Celery's task facts; an
    `extra=` such as image, call_id or outcome passes as given) and redaction of the whole record."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level", "name": "logger"},
                         json_ensure_ascii=False)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["ts"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)
        log_data["process"] = record.process
        log_data["thread"] = record.threadName
        for key, value in _context.get().items():
            log_data.setdefault(key, value)
        _celery_fields(log_data, record)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        scrubbed: dict[str, Any] = scrub(log_data)
        return scrubbed


def _celery_fields(log_data: dict[str, Any], record: logging.LogRecord) -> None:
    """Celery's task lines carry their facts in `data` (id, name, args, runtime...): lifted to top-level
    fields with the task's outcome; lines logged inside a task get the task's id and name."""
    data = log_data.pop("data", None)
    if isinstance(data, Mapping):
        for src, dst in (("id", "task_id"), ("name", "task"), ("runtime", "runtime_s"), ("args", "args"),
                         ("exc", "error")):
            if data.get(src) is not None:
                log_data.setdefault(dst, data[src])
        template = str(record.msg)
        for marker, outcome in _CELERY_OUTCOMES:
            if marker in template:
                log_data.setdefault("outcome", outcome)
                break
    elif data is not None:
        log_data["data"] = data
    if "task_id" not in log_data:
        task = get_current_task()
        if task is not None and task.request.id:
            log_data["task_id"], log_data["task"] = task.request.id, task.name


class JsonLogFormatter(redact.RedactingFormatter):
    """One JSON object a line. A RedactingFormatter, so redact.install leaves it unwrapped: redacting the
    finished line as text could cut through JSON quoting, so each field is redacted before encoding instead."""

    def __init__(self) -> None:
        super().__init__()
        self._json = _Json()

    def format(self, record: logging.LogRecord) -> str:
        return self._json.format(record)


def formatter_for(fmt: str) -> logging.Formatter:
    return JsonLogFormatter() if resolve(fmt) == "json" else logging.Formatter(TEXT_FORMAT)


def apply(logger: logging.Logger, fmt: str) -> None:
    """In JSON mode, every handler of the logger formats JSON; text mode keeps the handlers' formatters."""
    if resolve(fmt) != "json":
        return
    for handler in logger.handlers:
        if not isinstance(handler.formatter, JsonLogFormatter):
            handler.setFormatter(JsonLogFormatter())


def configure(fmt: str, level: int | None = None) -> logging.Handler:
    """For entry points Celery does not set up (the CLI, and the worker before Celery's own setup): one
    stderr handler on the root logger in the chosen format, redacted; the root at WARNING (botocore and httpx
    are chatty at INFO), irlive's loggers at `level` if given (a worker leaves that to its --loglevel)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_irlive", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(fmt))
    handler._irlive = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    if level is not None:
        logging.getLogger("irlive").setLevel(level)
    # Warnings (deprecations) as records in the same format, not raw stderr.
    logging.captureWarnings(True)

    redact.install(root)
    return handler


def say_root_once() -> None:
    """A worker as root: Celery's SecurityWarning is a paragraph on every start (containers often run as root; the
    deploy files do not), through its own text formatter whatever the format; said here as one INFO line instead."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        warnings.filterwarnings("ignore", message=".*superuser privileges.*")
        logging.getLogger("irlive.logs").info("the worker runs as root (uid 0); Celery advises against it")


# kombu's Redis transport logs a refusal it retries itself (out of memory, read-only, a dropped connection) as a
# WARNING with two chained tracebacks, once a second for as long as it lasts.
BROKER_LOGGER = "kombu.transport.redis"
BROKER_RETRY_EVERY_S = 30.0


class BrokerRetryLine(logging.Filter):
    """One line with the reason instead of the tracebacks, at most every BROKER_RETRY_EVERY_S per message."""

    def __init__(self, every_s: float = BROKER_RETRY_EVERY_S) -> None:
        super().__init__()
        self._every_s = every_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not type(exc).__module__.startswith("redis"):
            return True
        what = record.getMessage()
        now = time.monotonic()
        if now - self._last.get(what, -self._every_s) < self._every_s:
            return False
        self._last[what] = now
        record.msg = f"{what}: {type(exc).__name__}: {exc} (kombu retries it; said at most every {self._every_s:.0f} s)"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        return True


def quiet_broker_retries() -> None:
    """Install BrokerRetryLine on kombu's Redis transport logger (once)."""
    logger = logging.getLogger(BROKER_LOGGER)
    if not any(isinstance(f, BrokerRetryLine) for f in logger.filters):
        logger.addFilter(BrokerRetryLine())
