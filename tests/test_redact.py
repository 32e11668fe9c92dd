"""worker.ops.redact: presigned queries, tokens, keys and URL passwords are scrubbed from text and from whole log
records (message, traceback, stack)."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
from celery.app.log import TaskFormatter
from celery.app.trace import LOG_FAILURE
from celery.utils.log import ColorFormatter

from worker.ops import redact as redact_module
from worker.ops.redact import RedactingFilter, install, mask_url, redact

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


# ---- URL credentials -------------------------------------------------------------------------------------

REDIS_URL = "redis://irlive-app:s3cretPassw0rd@cache.internal:6379/0"
TOKEN = "ptk_Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4"
API_KEY = "sk-live-4f3c2b1a0987"
LEAKS = (*SECRETS, "s3cretPassw0rd", TOKEN, API_KEY)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (REDIS_URL, "redis://***@cache.internal:6379/0"),
        ("rediss://:s3cretPassw0rd@cache.internal:6380/2", "rediss://***@cache.internal:6380/2"),
        ("redis://irlive-app:s3cret@Passw0rd@cache:6379/0", "redis://***@cache:6379/0"),
        # The parser ends the authority at the "?": where the credential ends cannot be told, so all of it goes.
        ("redis://irlive-app:s3cret?Passw0rd@cache:6379/0", "redis://***"),
        ("amqp://guest:s3cretPassw0rd@rabbit:5672//", "amqp://***@rabbit:5672//"),
        ("https://user:s3cretPassw0rd@market.example.com/api", "https://***@market.example.com/api"),
        ("unix:///run/redis.sock?db=0&password=s3cretPassw0rd", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://cache:6379/0?password=s3cretPassw0rd&health_check_interval=30",
         "redis://cache:6379/0?password=***&health_check_interval=30"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("http://127.0.0.1:8402", "http://127.0.0.1:8402"),
    ],
)
def test_mask_url_hides_userinfo_and_secret_query_values(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "text",
    [
        f"Error connecting to {REDIS_URL}: Connection refused",
        f"settings {{'redis_url': '{REDIS_URL}'}}",
        f'{{"redis_url": "{REDIS_URL}"}}',
        f"ConnectionPool(url={REDIS_URL!r})",
        "consumer: Cannot connect to redis://irlive-app:s3cretPassw0rd@127.0.0.1:6379/0: Error 111.",
        "redis://:s3cretPassw0rd@cache:6379",
        "kwargs {'host': 'cache', 'password': 's3cretPassw0rd'}",
        "AUTH password=s3cretPassw0rd",
    ],
)
def test_redact_masks_url_userinfo_and_passwords_wherever_they_appear(text: str) -> None:
    out = redact(text)
    assert "s3cretPassw0rd" not in out
    assert "irlive-app:" not in out


def test_redact_keeps_the_host_of_a_url_with_userinfo() -> None:
    assert redact(f"connecting to {REDIS_URL} now") == "connecting to redis://***@cache.internal:6379/0 now"


@pytest.mark.parametrize(
    "text",
    [
        f"X-Payment-Token: {TOKEN}",
        f"X-Payment-Token:{TOKEN}",
        f'"paymentToken": "{TOKEN}"',
        f"{{'paymentToken': '{TOKEN}'}}",
        f"token={TOKEN}&x=1",
        f"payment_token={TOKEN}",
        f"Authorization: Bearer {TOKEN}",
    ],
)
def test_every_form_of_a_payment_token_is_scrubbed(text: str) -> None:
    assert TOKEN not in redact(text)


def test_redact_is_idempotent() -> None:
    text = f"{SIGV4} X-Payment-Token: {TOKEN} {REDIS_URL} api_key={API_KEY}"
    once = redact(text)
    assert redact(once) == once


# ---- whole records: tracebacks and stacks ---------------------------------------------------------------


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger with one stream handler (Celery's plain ColorFormatter) and redaction installed on it."""
    logger = logging.getLogger("irlive.test_redact.captured")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(ColorFormatter("[%(levelname)s/%(processName)s] %(message)s", use_color=False))
    logger.addHandler(handler)
    install(logger)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def _connect_and_pay(url: str) -> None:
    def pay(token: str) -> None:
        # The literals make the secrets part of the traceback's frame lines, not only of its message.
        raise RuntimeError(f"seller refused X-Payment-Token: {token} for {SIGV4} over {url}")

    try:
        pay(token="ptk_Zm9vYmFyYmF6cXV4cXV1eDEyMzQ1Njc4")
    except RuntimeError as exc:
        raise ConnectionError(f"Error connecting to {url}; api_key={API_KEY}") from exc


def assert_clean(text: str) -> None:
    leaked = [s for s in LEAKS if s in text]
    assert leaked == [], text


def test_log_exception_traceback_is_redacted(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        _connect_and_pay(REDIS_URL)
    except ConnectionError:
        logger.exception("chunk %s: unexpected failure", "run-1/0")
    out = stream.getvalue()
    assert_clean(out)
    assert "chunk run-1/0: unexpected failure" in out
    # Still a useful traceback: both exceptions, their frames and the redacted values' surroundings.
    assert "Traceback (most recent call last)" in out
    assert "The above exception was the direct cause of the following exception" in out
    assert "RuntimeError: seller refused X-Payment-Token: *** for" in out
    assert "ConnectionError: Error connecting to redis://***@cache.internal:6379/0; api_key=***" in out
    assert "pay(token=***" in out and "in _connect_and_pay" in out


def test_every_handler_prints_the_redacted_traceback(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, first = captured
    second = io.StringIO()
    extra = logging.StreamHandler(second)
    logger.addHandler(extra)
    install(logger)
    try:
        try:
            _connect_and_pay(REDIS_URL)
        except ConnectionError:
            logger.error("failed", exc_info=True)
    finally:
        logger.removeHandler(extra)
    for out in (first.getvalue(), second.getvalue()):
        assert "Traceback (most recent call last)" in out
        assert_clean(out)


def test_a_traceback_already_rendered_by_another_handler_is_redacted() -> None:
    try:
        _connect_and_pay(REDIS_URL)
    except ConnectionError:
        record = logging.LogRecord("irlive", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    # An earlier handler without the filter cached the raw traceback on the record.
    record.exc_text = logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
    assert RedactingFilter().filter(record) is True
    out = logging.Formatter().format(record)
    assert "Traceback (most recent call last)" in out
    assert_clean(out)


def test_exc_info_given_as_true_on_a_hand_made_record(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        _connect_and_pay(REDIS_URL)
    except ConnectionError:
        record = logging.LogRecord("irlive", logging.ERROR, __file__, 1, "failed", None, True)  # type: ignore[arg-type]
        logger.handle(record)
    assert "Traceback (most recent call last)" in stream.getvalue()
    assert_clean(stream.getvalue())


def test_stack_info_is_redacted(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    # The literal is on the logging call's own line, so the stack shows it.
    logger.warning("slow call", stack_info=True, extra={"url": "redis://irlive-app:s3cretPassw0rd@cache:6379/0"})
    out = stream.getvalue()
    assert "Stack (most recent call last)" in out and "slow call" in out
    assert "redis://***@cache:6379/0" in out
    assert_clean(out)


def test_celery_task_failure_record_is_redacted() -> None:
    """The record celery.app.trace logs for a task that raised: LOG_FAILURE, a context dict, exc_info."""
    logger = logging.getLogger("celery.app.trace.test_redact")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    # Celery's task formatter, with a format that also prints the `data` Celery attaches to the record.
    handler.setFormatter(TaskFormatter("%(levelname)s %(task_name)s: %(message)s | %(data)s", use_color=False))
    logger.addHandler(handler)
    install(logger)
    try:
        try:
            _connect_and_pay(REDIS_URL)
        except ConnectionError as exc:
            einfo = sys.exc_info()
            context = {
                "hostname": "w1@host", "id": "9f0c", "name": "irlive.process_chunk", "exc": repr(exc),
                "traceback": logging.Formatter().formatException(einfo), "args": repr(({"token": TOKEN},)),
                "kwargs": "{}", "description": "raised unexpected", "internal": False,
            }
            logger.log(logging.ERROR, LOG_FAILURE.strip(), context, exc_info=einfo, extra={"data": context})
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "Task irlive.process_chunk[9f0c] raised unexpected: ConnectionError(" in out
    assert "Traceback (most recent call last)" in out
    assert_clean(out)


def test_unformattable_arguments_are_printed_redacted_not_raw(
    captured: tuple[logging.Logger, io.StringIO], capsys: pytest.CaptureFixture[str]
) -> None:
    logger, stream = captured
    logger.warning("paying with %s and %d", f"X-Payment-Token: {TOKEN}")
    out = stream.getvalue() + capsys.readouterr().err
    assert "paying with" in out
    assert "Logging error" not in out, "the handler fell back to printing the raw record"
    assert_clean(out)


def test_install_wraps_the_formatter_once_and_keeps_its_format() -> None:
    logger = logging.getLogger("irlive.test_redact.format")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("<%(levelname)s> %(message)s"))
    logger.addHandler(handler)
    try:
        install(logger)
        install(logger)
        assert isinstance(handler.formatter, redact_module.RedactingFormatter)
        assert not isinstance(handler.formatter.inner, redact_module.RedactingFormatter)
        logger.warning("chunk %d done", 3)
        assert stream.getvalue() == "<WARNING> chunk 3 done\n"
    finally:
        logger.removeHandler(handler)


def test_a_kept_answer_loses_its_signatures_and_stays_readable_json() -> None:
    from worker.ops.redact import scrub_answer

    url = "https://s3.example/b/k%20x.png?X-Amz-Credential=AKIA%2Fx&X-Amz-Signature=feedface"
    inner = json.dumps({"Data": {"Elements": [{"ImageURL": url, "FaceNumber": 0}]}})
    raw = json.dumps({"code": "200", "requestId": "r1", "data": {"Result": inner}}).encode()
    kept = scrub_answer(raw)
    assert "feedface" not in kept and "AKIA" not in kept
    result = json.loads(json.loads(kept)["data"]["Result"])
    assert result["Data"]["Elements"][0]["ImageURL"] == "https://s3.example/b/k%20x.png?***"
    assert "abc123" not in scrub_answer(b"<html>token=abc123</html>"), "not JSON: redacted as text"
