"""Run-end notifications: the event payload, its HMAC signature, and delivery with bounded retries (the HTTP
POST itself is the webhook seam's, worker/seams/webhook.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

from worker.backoff import Backoff
from worker.config import S3Location
from worker.errors import ConfigError, NotifyFailed, NotifyRefused
from worker.judge.manifest import run_manifest_key
from worker.ops.redact import redact

log = logging.getLogger(__name__)

EVENTS = ("run.done", "run.failed", "run.cancelled", "run.paused_budget")
SCHEMA_VERSION = 1
COUNTS = ("live", "spoof", "no_face", "rejected", "error", "not_judged")
# A receiver should refuse a signature older than this (a replayed request); verify() applies it.
TOLERANCE_S = 300


class Sender(Protocol):
    """What delivers one notification: worker.seams.webhook.Notifier, or a fake in tests."""

    def send(self, url: str, secret: str | None, payload: Mapping[str, Any]) -> None: ...


NOTIFY_BACKOFF = Backoff(base_s=2.0, cap_s=60.0)


@dataclass(frozen=True)
class Outcome:
    """How a delivery ended; `reason` is safe to log (no URL path, query or secret)."""

    delivered: bool
    attempts: int
    reason: str
    status: int | None = None


def event_id(run_id: str, event: str, occurrence: str = "") -> str:
    """The same for every retry of one event, so a receiver can drop duplicates; `occurrence` tells apart a
    second pause or a redriven run's second end."""
    digest = hashlib.sha256(f"{run_id}\n{event}\n{occurrence}".encode()).hexdigest()
    return f"evt_{digest[:32]}"


def run_end_event(run: Mapping[str, Any], manifest: Mapping[str, Any] | None, event: str, *,
                  now: datetime | None = None) -> dict[str, Any]:
    """The JSON payload announcing a run's end (or its pause for budget), from the run hash and, once written,
    the run manifest (whose counts win: they are the sum of the chunk manifests). Never carries the notify
    URL or anything else of the run hash that is not listed here."""
    if event not in EVENTS:
        raise ConfigError(f"unknown notification event {event!r}; expected one of {', '.join(EVENTS)}")
    run_id = str(run["run_id"])
    state = str(run.get("state") or "")
    source_counts = manifest.get("counts", {}) if manifest else {}
    counts = {v: _int(source_counts.get(v, run.get(v))) for v in COUNTS}
    total, done = _int(run.get("total")), _int(run.get("done"))
    spend = _int(manifest["spend_cents"] if manifest and "spend_cents" in manifest else run.get("spend_cents"))
    budget = _int(run["budget_cents"]) if run.get("budget_cents") not in (None, "") else None
    reason = run.get("stop_reason") or run.get("pause_reason") or None
    finished = (manifest or {}).get("finished_at") or run.get("finished_at") or None
    # A second pause comes only after a resume with a higher budget; a second end only after a redrive,
    # which sets finished_at anew.
    occurrence = str(budget) if event == "run.paused_budget" else str(finished or reason or "")
    return {
        "schema_version": SCHEMA_VERSION,
        "id": event_id(run_id, event, occurrence),
        "event": event,
        "run_id": run_id,
        "state": state,
        "stop_reason": redact(str(reason)) if reason else None,
        "source": run.get("source"),
        "counts": counts,
        "images": {"total": total, "done": done, "skipped": _int(run.get("skipped"))},
        "calls": _int(manifest["calls"] if manifest and "calls" in manifest else run.get("calls")),
        "spend_cents": spend,
        "spend_usd": f"{spend / 100:.2f}",
        "budget_cents": budget,
        "budget_usd": f"{budget / 100:.2f}" if budget is not None else None,
        "manifest": _manifest_url(run, manifest),
        # The page a person opens (written with the manifest), and the labels `scan --tag` gave the run.
        "report": _report_url(run, manifest),
        "tags": _tags(run, manifest),
        "created_at": run.get("created_at") or None,
        "finished_at": finished,
        "occurred_at": (now or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def body_of(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed and signed (ASCII JSON, keys sorted, no spaces)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(secret: str, timestamp: int | str, body: bytes | str) -> str:
    """`sha256=<hex>` of HMAC-SHA256(secret, f"{timestamp}.{body}"): the X-Irlive-Signature header."""
    raw = body.encode() if isinstance(body, str) else body
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + raw, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes | str, signature: str, *,
           tolerance_s: float = TOLERANCE_S, now: float | None = None) -> bool:
    """What a receiver runs on each POST: the signature matches the raw body and the timestamp is fresh.
    Self-contained (hashlib, hmac, time) so a receiver can copy it."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance_s:
        return False
    if not signature.isascii():
        # compare_digest refuses non-ASCII str (TypeError): a header a sender garbled is just not a match.
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def headers(payload: Mapping[str, Any], secret: str | None, body: bytes, timestamp: int) -> dict[str, str]:
    """The headers of one POST; the signature only when a secret is set."""
    out = {"Content-Type": "application/json", "User-Agent": "irlive-notify/1",
           "X-Irlive-Event": str(payload.get("event", "")), "X-Irlive-Delivery": str(payload.get("id", "")),
           "X-Irlive-Timestamp": str(timestamp)}
    if secret:
        out["X-Irlive-Signature"] = sign(secret, timestamp, body)
    return out


def safe_target(url: str) -> str:
    """scheme://host[:port] of a webhook URL: its path and query often are its credential, so only this is
    ever logged or put in an error."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unreadable URL)"
    return f"{parts.scheme or '?'}://{host}{port}"


def deliver(notifier: Sender, url: str, secret: str | None, payload: Mapping[str, Any], *, attempts: int = 5,
            backoff: Backoff = NOTIFY_BACKOFF, sleep: Callable[[float], None] = time.sleep,
            rand: Callable[[], float] = random.random) -> Outcome:
    """POST the payload until a receiver takes it, it is refused for good, or `attempts` run out. Never
    raises: a notification is a courtesy and must not fail the run it announces."""
    target = safe_target(url)
    event = str(payload.get("event", "?"))
    tried = 0
    last = "no attempt made"
    status: int | None = None
    for tried in range(1, max(1, attempts) + 1):
        try:
            notifier.send(url, secret, payload)
        except NotifyRefused as exc:
            outcome = Outcome(False, tried, f"refused: {redact(str(exc))}", exc.status)
            log.warning("notification %s to %s given up: %s", event, target, outcome.reason)
            return outcome
        except NotifyFailed as exc:
            last, status = redact(str(exc)), exc.status
            if tried < attempts:
                wait = backoff.delay(tried - 1, rand())
                if exc.retry_after is not None:
                    wait = max(wait, min(exc.retry_after, backoff.cap_s))
                log.info("notification %s to %s failed (%s); attempt %d of %d in %.1fs",
                         event, target, last, tried, attempts, wait)
                sleep(wait)
            continue
        except Exception as exc:  # a bug must not fail the run the notification announces
            outcome = Outcome(False, tried, f"unexpected {type(exc).__name__}", None)
            log.error("notification %s to %s given up: %s", event, target, outcome.reason)
            return outcome
        log.info("notification %s delivered to %s (attempt %d)", event, target, tried)
        return Outcome(True, tried, "delivered", None)
    outcome = Outcome(False, tried, f"gave up after {tried} attempts: {last}", status)
    log.warning("notification %s to %s given up: %s", event, target, outcome.reason)
    return outcome


def _manifest_url(run: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> str | None:
    """Where the run manifest is, once it is written (a run that failed or paused has none yet)."""
    if manifest is None and run.get("state") != "done":
        return None
    return _s3_url(run, lambda output: run_manifest_key(output, str(run["run_id"])))


def _report_url(run: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> str | None:
    """Where the run's report.html is, once the manifest that names it is written."""
    key = (manifest or {}).get("report")
    return _s3_url(run, lambda _: str(key)) if key else None


def _s3_url(run: Mapping[str, Any], key_in: Callable[[S3Location], str]) -> str | None:
    """s3:// of a key in the run's output bucket; None when the run names no readable output."""
    try:
        output = S3Location.parse(str(run.get("output") or ""), "run output")
    except ConfigError:
        return None
    return f"s3://{output.bucket}/{key_in(output)}"


def _tags(run: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> dict[str, str]:
    """The run's `scan --tag` labels: the manifest's once written, else the run record's."""
    tags = (manifest or {}).get("tags")
    if isinstance(tags, dict):
        return {str(k): str(v) for k, v in tags.items()}
    try:
        found = json.loads(str(run.get("tags") or "{}"))
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0
