"""worker.ops.redact: presigned queries, tokens and keys are scrubbed from text and from log records."""

from __future__ import annotations

import io
import logging

import pytest

from worker.ops.redact import RedactingFilter, install, redact

SIGV4 = ("https://in-bucket.s3.us-east-1.amazonaws.com/cam/2024/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
         "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
         "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
         "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLETOKEN"
         "&X-Amz-Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
SIGV2 = ("http://127.0.0.1:5000/in-bucket/cam/b.jpg?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE"
         "&Signature=vjbyPxybdZaNmGa%2ByT272YEAiv4%3D&Expires=1704067200")
SECRETS = ("0123456789abcdef0123456789abcdef", "vjbyPxybdZaNmGa", "AKIAIOSFODNN7EXAMPLE", "FwoGZXIvYXdzEXAMPLETOKEN")


@pytest.mark.parametrize("url", [SIGV4, SIGV2])
def test_presigned_url_keeps_its_path_and_loses_its_query(url: str) -> None:
    out = redact(f"downloading {url} failed")
    assert out == f"downloading {url.split('?')[0]}?*** failed"
    assert not any(s in out for s in SECRETS)


@pytest.mark.parametrize("url", [SIGV4, SIGV2])
def test_presigned_url_inside_json_is_scrubbed(url: str) -> None:
    out = redact('{"Tasks": [{"ImageURL": "' + url + '"}]}')
    assert not any(s in out for s in SECRETS)
    assert url.split("?")[0] in out


def test_bare_signature_parameters_are_scrubbed() -> None:
    out = redact("query was X-Amz-Credential=AKIAIOSFODNN7EXAMPLE/x&X-Amz-Signature=0123456789abcdef0123456789abcdef")
    assert out == "query was X-Amz-Credential=***&X-Amz-Signature=***"
    assert redact("Signature=abc%2Bdef&AWSAccessKeyId=AKIAX") == "Signature=***&AWSAccessKeyId=***"


def test_payment_token_header_is_scrubbed() -> None:
    assert redact("X-Payment-Token: abc") == "X-Payment-Token: ***"
    assert redact("headers {'X-Payment-Token': 'tok_1'}") == "headers {'X-Payment-Token': ***}"


def test_token_json_fields_are_scrubbed() -> None:
    assert redact('{"paymentId": "p1", "token": "tok_9f8e7d"}') == '{"paymentId": "p1", "token": ***}'
    assert "tok_9f8e7d" not in redact('{"paymentToken":"tok_9f8e7d","status":"paid"}')


def test_api_key_assignments_are_scrubbed() -> None:
    assert redact("connecting with api_key=sk_live_123 now") == "connecting with api_key=*** now"
    assert redact("X-API-Key: sk_live_123") == "X-API-Key: ***"
    assert "sk_live_123" not in redact("apikey=sk_live_123&x=1")


def test_authorization_bearer_value_is_scrubbed() -> None:
    assert "s3cr3t" not in redact("Authorization: Bearer s3cr3t")
    assert "s3cr3t" not in redact('{"authorization": "Bearer s3cr3t"}')


@pytest.mark.parametrize(
    "text",
    [
        "judged 10 images: 7 live, 2 spoof, 1 no_face in 1.2s",
        "the token bucket refilled; 3 tokens left",
        "see https://docs.example.com/irlive/operations.html#budget for details",
        "s3://irlive-out/results/runs/20240101T000000Z-abc123/manifest.json",
        "Label normal means live; liveness means spoof",
        "",
    ],
)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert redact(text) == text


def test_logging_filter_scrubs_a_record_formatted_with_args() -> None:
    record = logging.LogRecord("irlive", logging.INFO, __file__, 1, "call %s with X-Payment-Token: %s -> %d",
                               (SIGV4, "tok_abc123", 200), None)
    assert RedactingFilter().filter(record) is True
    message = record.getMessage()
    assert "tok_abc123" not in message
    assert not any(s in message for s in SECRETS)
    assert message.startswith("call https://in-bucket.s3.us-east-1.amazonaws.com/cam/2024/a.png?***")
    assert message.endswith("-> 200")


def test_logging_filter_leaves_clean_records_and_their_args_alone() -> None:
    record = logging.LogRecord("irlive", logging.INFO, __file__, 1, "chunk %d done", (3,), None)
    assert RedactingFilter().filter(record) is True
    assert (record.msg, record.args) == ("chunk %d done", (3,))


def test_install_attaches_the_filter_once_to_every_handler() -> None:
    logger = logging.getLogger("irlive.test_redact")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        install(logger)
        install(logger)
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
        logger.warning("payment %s", '{"token": "tok_zzz"}')
        assert "tok_zzz" not in stream.getvalue()
        assert "payment" in stream.getvalue()
    finally:
        logger.removeHandler(handler)
