"""S3 event messages as they reach SQS (straight from S3, through SNS raw or not, through EventBridge) -> the objects
they announce as created (pure: no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from worker.flow.intake import EventObject


class Unparseable(ValueError):
    """A message irlive cannot read as an S3 event: left on the queue for its redrive policy (the DLQ)."""


@dataclass
class Parsed:
    """What one SQS message says."""

    created: list[EventObject] = field(default_factory=list)
    tests: int = 0  # s3:TestEvent, sent when a notification is configured
    other: int = 0  # other event types (deletes, restores...): acknowledged, nothing to judge


def parse_message(body: str) -> Parsed:
    """The objects created, from any of the three shapes; Unparseable when it is none of them."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise Unparseable("not JSON") from None
    parsed = Parsed()
    _read(doc, parsed, depth=0)
    return parsed


def _read(doc: Any, parsed: Parsed, depth: int) -> None:
    if not isinstance(doc, dict) or depth > 3:
        raise Unparseable("not an S3 event (neither S3's, SNS's nor EventBridge's shape)")
    if doc.get("Type") == "Notification" and isinstance(doc.get("Message"), str):
        # Through SNS (not raw): the S3 event is the envelope's Message, as a JSON string.
        try:
            inner = json.loads(doc["Message"])
        except (ValueError, RecursionError):
            raise Unparseable("an SNS notification whose Message is not JSON") from None
        _read(inner, parsed, depth + 1)
    elif doc.get("Event") == "s3:TestEvent":
        parsed.tests += 1
    elif isinstance(doc.get("Records"), list):
        for record in doc["Records"]:
            _record(record, parsed)
    elif doc.get("source") == "aws.s3" and isinstance(doc.get("detail"), dict):
        _eventbridge(doc, parsed)
    else:
        raise Unparseable("not an S3 event (neither S3's, SNS's nor EventBridge's shape)")


def _record(record: Any, parsed: Parsed) -> None:
    if not isinstance(record, dict):
        raise Unparseable("an S3 event record that is not an object")
    name = str(record.get("eventName", ""))
    if record.get("eventSource") != "aws:s3" or not name.startswith("ObjectCreated:"):
        parsed.other += 1
        return
    s3: Any = record.get("s3")
    try:
        bucket = str(s3["bucket"]["name"])
        # S3 notifications URL-encode keys, with '+' for a space.
        key = unquote_plus(str(s3["object"]["key"]))
        etag = str(s3["object"].get("eTag") or s3["object"].get("etag") or "")
    except (KeyError, TypeError, AttributeError):
        raise Unparseable("an ObjectCreated record without bucket or key") from None
    parsed.created.append(EventObject(bucket, key, etag.strip('"')))


def _eventbridge(doc: dict[str, Any], parsed: Parsed) -> None:
    if doc.get("detail-type") != "Object Created":
        parsed.other += 1
        return
    detail = doc["detail"]
    try:
        bucket = str(detail["bucket"]["name"])
        # EventBridge carries the key as it is (not URL-encoded).
        key = str(detail["object"]["key"])
        etag = str(detail["object"].get("etag") or "")
    except (KeyError, TypeError, AttributeError):
        raise Unparseable("an EventBridge Object Created event without bucket or key") from None
    parsed.created.append(EventObject(bucket, key, etag.strip('"')))
