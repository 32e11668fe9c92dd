"""S3 event messages in the three shapes users have, read into the objects they announce (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from producer.events import Unparseable, parse_message
from worker.flow.intake import EventObject


def s3_record(key: str, name: str = "ObjectCreated:Put", bucket: str = "cams", etag: str = "abc") -> dict[str, Any]:
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": name,
            "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 10, "eTag": etag}}}


def test_a_plain_s3_notification_decodes_its_keys() -> None:
    body = json.dumps({"Records": [s3_record("day+1/a%2Bb+c%C3%BC.png"), s3_record("x.png", etag='"q"')]})
    parsed = parse_message(body)
    assert parsed.created == [EventObject("cams", "day 1/a+b cü.png", "abc"), EventObject("cams", "x.png", "q")]


def test_other_event_types_and_sources_are_acknowledged_not_judged() -> None:
    body = json.dumps({"Records": [s3_record("a.png", "ObjectRemoved:Delete"), {"eventSource": "aws:sns"},
                                   s3_record("b.png", "ObjectCreated:CompleteMultipartUpload")]})
    parsed = parse_message(body)
    assert [o.key for o in parsed.created] == ["b.png"] and parsed.other == 2


def test_the_test_event_is_counted() -> None:
    parsed = parse_message(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "cams"}))
    assert (parsed.tests, parsed.created) == (1, [])


def test_an_sns_envelope_carries_the_s3_event_as_a_string() -> None:
    inner = json.dumps({"Records": [s3_record("a%20b.png")]})
    parsed = parse_message(json.dumps({"Type": "Notification", "MessageId": "m", "Message": inner}))
    assert parsed.created == [EventObject("cams", "a b.png", "abc")]


def test_eventbridge_keys_arrive_as_they_are() -> None:
    doc = {"version": "0", "detail-type": "Object Created", "source": "aws.s3",
           "detail": {"bucket": {"name": "cams"}, "object": {"key": "raw/a+b 10:03.png", "etag": "e1", "size": 9}}}
    assert parse_message(json.dumps(doc)).created == [EventObject("cams", "raw/a+b 10:03.png", "e1")]
    doc["detail-type"] = "Object Deleted"
    assert parse_message(json.dumps(doc)).other == 1


NO_OBJECT = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"}]}


@pytest.mark.parametrize("body", ["not json", "[]", json.dumps({"hello": "world"}), json.dumps(NO_OBJECT),
                                  json.dumps({"Type": "Notification", "Message": "{broken"}),
                                  "[" * 100_000])
def test_what_is_not_an_s3_event_is_unparseable(body: str) -> None:
    with pytest.raises(Unparseable):
        parse_message(body)
