"""Structured logs: IRLIVE_LOG_FORMAT, the JSON formatter (every field redacted, the task's run and chunk on every
line), the CLI's and Celery's wiring; and JSON lines of a real run through real `celery worker` processes."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.app.trace import LOG_RETRY, LOG_SUCCESS

from sandbox import procs
from sandbox.images import Sample, png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, SECRET_PATTERNS, all_output_text, payment_tokens, upload
from tests.test_secrets import assert_no_secret
from worker.app import _task_context, chunk_argsrepr, make_app, send_chunk
from worker.config import Settings
from worker.errors import ConfigError
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.messages import FINALIZE_RUN, PROCESS_CHUNK, Chunk
from worker.ops import logs, redact
from worker.seams.store import Store

REDIS_USER = "irlive-logs"
PASSWORD = "s3cretPassw0rd"
API_KEY = "sk-live-irlive-7f3e9a1c5b"
PAY_TOKEN = "ptok_4f9a8b7c6d5e"
SIGNATURE = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
SECRETS = (PASSWORD, API_KEY, PAY_TOKEN, SIGNATURE)
REDIS_URL = f"redis://irlive-app:{PASSWORD}@127.0.0.1:6379/0"
PRESIGNED = (f"https://s3.example/irlive-in/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE"
             f"&X-Amz-Signature={SIGNATURE}")
# Lines Celery prints itself, past logging, on a warm shutdown (celery.apps.worker: safe_say to stdout).
# Lines Celery writes past irlive's JSON formatter: its shutdown print, and (in a full test session, as root)
# its root warning with the two lines of text that follow it, emitted from inside its own logging setup.
CELERY_PRINTS = re.compile(r"^worker: (Warm|Cold|Hard) shutdown \(MainProcess\)$")
# Celery's root warning, printed through its own text formatter; its lines after this one (the warning's text
# and the source line Python quotes, which differs by call site) run up to the next JSON record.
CELERY_ROOT_WARNING = re.compile(r"^\[[^]]+: WARNING/MainProcess\] py\.warnings: .*SecurityWarning: You're "
                                 r"running the worker with superuser privileges")


class Leaky:
    """An object whose text holds a secret: the JSON encoder would print str() of it past any string check."""

    def __str__(self) -> str:
        return f"conn to {REDIS_URL}"


def _record(msg: str, *args: Any, level: int = logging.WARNING, exc: BaseException | None = None,
            name: str = "irlive.test", **extra: Any) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logging.LogRecord(name, level, __file__, 1, msg, args or None, exc_info)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def _raised(text: str) -> BaseException:
    try:
        raise RuntimeError(text)
    except RuntimeError as exc:
        return exc


def _no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert leaked == [], f"secret(s) in {text!r}: {leaked}"
    assert SECRET_PATTERNS.search(text) is None or "***" in text, text


@pytest.fixture
def json_handler() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger with one stream handler in JSON mode, redaction installed as the worker installs it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"irlive.test.{id(stream)}")
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(logging.DEBUG)
    logs.apply(logger, "json")
    redact.install(logger)
    yield logger, stream
    logger.handlers = []


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# ---------------------------------------------------------------- the setting


def test_log_format_setting_parses_and_defaults_to_text() -> None:
    assert Settings().log_format == "text"
    assert Settings.from_env({"IRLIVE_LOG_FORMAT": " JSON "}).log_format == "json"
    assert Settings.from_env({"IRLIVE_LOG_FORMAT": "text"}).log_format == "text"
    with pytest.raises(ConfigError, match="IRLIVE_LOG_FORMAT"):
        Settings.from_env({"IRLIVE_LOG_FORMAT": "xml"})


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    assert logs.resolve("auto", _Tty()) == "text"
    assert logs.resolve("auto", io.StringIO()) == "json"
    assert logs.resolve("json", _Tty()) == "json" and logs.resolve("text", io.StringIO()) == "text"
    closed = io.StringIO()
    closed.close()
    assert logs.resolve("auto", closed) == "json"
    with pytest.raises(ValueError):
        logs.resolve("yaml")


# ---------------------------------------------------------------- the formatter


def test_json_line_has_the_fields_and_redacts_every_one(json_handler: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_handler
    exc = _raised(f"refused by {REDIS_URL} X-Payment-Token: {PAY_TOKEN}")
    logger.error("call %s to %s failed", "call-1", PRESIGNED, exc_info=(type(exc), exc, exc.__traceback__),
                 stack_info=True,
                 extra={"image": "irlive-in/a.png@etag1", "call_id": "call-1", "outcome": "error",
                        "url": PRESIGNED, "api_key": API_KEY, "payment": {"token": PAY_TOKEN, "cents": 2,
                                                                          "urls": [PRESIGNED]},
                        "conn": Leaky(), "note": f"api_key={API_KEY}", f"password={PASSWORD}": "a key that leaks"})
    text = stream.getvalue()
    assert text.count("\n") == 1, "one event, one line"
    (line,) = _lines(stream)
    _no_secret(text)
    assert line["level"] == "ERROR" and line["logger"] == logger.name
    assert line["message"].startswith("call call-1 to https://s3.example/irlive-in/a.png?*** failed")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["ts"])
    assert line["image"] == "irlive-in/a.png@etag1" and line["call_id"] == "call-1" and line["outcome"] == "error"
    assert line["api_key"] == "***" and line["payment"]["token"] == "***" and line["payment"]["cents"] == 2
    assert line["payment"]["urls"] == ["https://s3.example/irlive-in/a.png?***"]
    assert line["conn"] == "conn to redis://***@127.0.0.1:6379/0"
    assert line["note"] == "api_key=***"
    assert "Traceback (most recent call last)" in line["exc_info"]
    assert "RuntimeError: refused by redis://***@127.0.0.1:6379/0 X-Payment-Token: ***" in line["exc_info"]
    assert "test_json_line_has_the_fields" in line["stack_info"]


def test_formatter_alone_redacts_exc_info_and_odd_messages() -> None:
    """Without redact's filter in front (a handler someone adds later), the formatter still redacts: the
    traceback it renders itself, a dict message, arguments that do not fit the format."""
    formatter = logs.JsonLogFormatter()
    exc = _raised(f"token={PAY_TOKEN}")
    out = formatter.format(_record("boom at %s", REDIS_URL, exc=exc))
    _no_secret(out)
    assert "token=***" in json.loads(out)["exc_info"]
    as_dict = formatter.format(_record({"event": "paid", "token": PAY_TOKEN, "url": PRESIGNED}))  # type: ignore[arg-type]
    _no_secret(as_dict)
    assert json.loads(as_dict)["event"] == "paid"
    misfit = _record("two %s %s", f"password={PASSWORD}")
    redact.RedactingFilter().filter(misfit)
    _no_secret(formatter.format(misfit))


def test_redact_install_keeps_the_json_formatter_unwrapped(json_handler: tuple[logging.Logger, io.StringIO]) -> None:
    """redact.install wraps text formatters to redact the finished line; a JSON line must not be wrapped (a
    masked `"token": "..."` would lose its quotes and the line its JSON)."""
    logger, stream = json_handler
    # (pytest adds its own capture handlers to every logger of a test's call)
    (handler,) = [h for h in logger.handlers if getattr(h, "stream", None) is stream]
    assert isinstance(handler.formatter, logs.JsonLogFormatter)
    redact.install(logger)
    assert isinstance(handler.formatter, logs.JsonLogFormatter)
    logger.warning('answer {"token": "%s", "Authorization": "Bearer %s"}', PAY_TOKEN, API_KEY)
    (line,) = _lines(stream)
    _no_secret(stream.getvalue())
    assert "***" in line["message"]


def test_text_mode_keeps_the_handlers_formatters() -> None:
    handler = logging.StreamHandler(io.StringIO())
    original = logging.Formatter("%(message)s")
    handler.setFormatter(original)
    logger = logging.getLogger("irlive.test.text")
    logger.handlers = [handler]
    try:
        logs.apply(logger, "text")
        assert handler.formatter is original
    finally:
        logger.handlers = []


def test_context_fields_on_every_line_of_the_block_and_only_there(
        json_handler: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_handler
    seen_elsewhere: list[dict[str, Any]] = []
    with logs.log_context(run_id="r-1", chunk=3):
        logger.info("first")
        with logs.log_context(image="b/k@e", call_id=None):
            logger.info("inner")
        # A thread started inside does not inherit it (the lease's heartbeat names its chunk in its text).
        thread = threading.Thread(target=lambda: seen_elsewhere.append(logs.current_context()))
        thread.start()
        thread.join()
        logger.info("explicit wins", extra={"chunk": 4})
    logger.info("after")
    first, inner, explicit, after = _lines(stream)
    assert (first["run_id"], first["chunk"]) == ("r-1", 3) and "image" not in first
    assert (inner["run_id"], inner["chunk"], inner["image"]) == ("r-1", 3, "b/k@e") and "call_id" not in inner
    assert explicit["chunk"] == 4
    assert "run_id" not in after and seen_elsewhere == [{}]
    token = logs.start(run_id="r-2")
    assert logs.current_context() == {"run_id": "r-2"}
    logs.leave(token)
    assert logs.current_context() == {}


def test_celery_task_lines_lift_their_data_and_outcome(json_handler: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = json_handler
    summary = chunk_argsrepr(Chunk("r-9", 2, IN_BUCKET, [("a.png", "e1"), ("b.png", "e2")]))
    ok = {"id": "tid-1", "name": PROCESS_CHUNK, "return_value": "None", "runtime": 0.25, "args": summary,
          "kwargs": "{}"}
    logger.info(LOG_SUCCESS.strip(), ok, extra={"data": ok})
    retry = {"id": "tid-1", "name": PROCESS_CHUNK, "exc": f"Retry in 5s: {REDIS_URL}"}
    logger.info(LOG_RETRY.strip(), retry, extra={"data": retry})
    success, retried = _lines(stream)
    assert success["task_id"] == "tid-1" and success["task"] == PROCESS_CHUNK and success["outcome"] == "succeeded"
    assert success["runtime_s"] == 0.25 and success["args"] == "[chunk r-9/2: 2 images]"
    assert retried["outcome"] == "retry" and "redis://***@" in retried["error"]
    _no_secret(stream.getvalue())


def test_chunk_summary_and_task_context_name_the_run_never_a_key() -> None:
    chunk = Chunk("run-7", 5, IN_BUCKET, [(f"secret-dir/img_{i}.png", f"etag{i}") for i in range(3)])
    assert chunk_argsrepr(chunk) == "[chunk run-7/5: 3 images]"
    assert _task_context(PROCESS_CHUNK, [chunk.to_message()]) == {"run_id": "run-7", "chunk": 5}
    assert _task_context(FINALIZE_RUN, ["run-7"]) == {"run_id": "run-7"}
    assert _task_context(PROCESS_CHUNK, [{"bad": 1}]) == {} and _task_context(PROCESS_CHUNK, []) == {}
    assert _task_context("celery.ping", []) == {}


def test_configure_puts_one_redacting_handler_on_root(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        logs.configure("json", logging.INFO)
        handler = logs.configure("json", logging.INFO)  # again (a second command in one process): still one handler
        assert [h for h in root.handlers if getattr(h, "_irlive", False)] == [handler]
        logging.getLogger("irlive.listen").info("event from %s", PRESIGNED)
        logging.getLogger("botocore.credentials").info("chatty third party")
        (line,) = _lines(stream)
        assert line["logger"] == "irlive.listen" and line["message"].endswith("?***")
        logs.configure("text")
        logging.getLogger("irlive.listen").warning("as text %s", REDIS_URL)
        assert stream.getvalue().splitlines()[-1].endswith("irlive.listen: as text redis://***@127.0.0.1:6379/0")
    finally:
        root.handlers, root.level = before, level
        logging.getLogger("irlive").setLevel(logging.NOTSET)
        logging.captureWarnings(False)


# ---------------------------------------------------------------- a real run through real workers


def _worker_log_lines(stack: Stack) -> dict[str, list[str]]:
    return {p.name: p.read_text(errors="replace").splitlines() for p in sorted(Path(stack.workdir).glob("w*.log"))}


@pytest.mark.integration
def test_json_logs_of_a_real_run(clean_stack: Stack, irlive: IrliveRunner) -> None:
    """Real workers in JSON mode, reaching Redis as a user with a password, paying with an API key and tokens:
    every line they write is one JSON record, the chunk lines carry the run, and test_secrets' checks find no
    secret, the traceback of a chunk task that fails quoting the Redis URL included."""
    stack = clean_stack
    admin = stack.redis_client()
    admin.acl_setuser(REDIS_USER, enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"],
                      commands=["+@all"], reset=True)
    url = stack.redis_url.replace("redis://", f"redis://{REDIS_USER}:{PASSWORD}@", 1)
    env = {"IRLIVE_LOG_FORMAT": "json", "IRLIVE_API_KEY": API_KEY, "IRLIVE_CHUNK_SIZE": "4",
           "IRLIVE_REDIS_URL": url}
    try:
        # The first call is refused for a download: its retry is logged from the call's own thread.
        stack.sandbox_config(api_key=API_KEY, download_refusals=1)
        # Two images the seller refuses: the rejection paths log too.
        samples = [Sample(f"logs/img_{i:02d}.png", png(256, 256, "live", seed=700 + i), "live") for i in range(10)]
        samples += [Sample(f"logs/bad_{i}.png", b"camera 3 heartbeat ok\nnot an image\n", "rejected")
                    for i in range(2)]
        upload(stack, samples)
        workers = [stack.start_worker(extra_env=env, concurrency=4) for _ in range(2)]
        scanned = irlive("scan", f"s3://{IN_BUCKET}/logs", "--json", env=env)
        assert scanned.returncode == 0, scanned.stderr
        run_id: str = json.loads(scanned.stdout)["run_id"]
        waited = irlive("status", run_id, "--wait", "--json", "--timeout", "90", env=env, timeout=120)
        assert json.loads(waited.stdout)["state"] == "done", waited.stdout + waited.stderr
        tokens = payment_tokens(stack)
        assert tokens, "the run paid with tokens"
        broken = _fail_a_chunk_quoting(stack, url, f"{url} X-Payment-Token: {tokens[0]} api_key={API_KEY}")
        procs.wait_until(lambda: any("unexpected failure" in "".join(lines)
                                     for lines in _worker_log_lines(stack).values()),
                         60, "the chunk's failure in a worker log", log=workers[0].log)
        # Warm shutdown, so the lines of the workers' whole life are in (and Celery's shutdown print).
        stack.stop_workers()
    finally:
        admin.acl_deluser(REDIS_USER)
        admin.close()

    secrets = [PASSWORD, API_KEY, *tokens]
    records: list[dict[str, Any]] = []
    for name, lines in _worker_log_lines(stack).items():
        assert lines, f"{name} is empty"
        in_warning = False
        for line in lines:
            if not line.strip() or CELERY_PRINTS.match(line):
                continue
            if CELERY_ROOT_WARNING.match(line):
                in_warning = True
                continue
            try:
                records.append(json.loads(line))
                in_warning = False
            except ValueError:
                if not in_warning:
                    pytest.fail(f"{name}: not a JSON line: {line!r}")
        assert_no_secret(f"worker log {name}", "\n".join(lines), secrets)
        # e2e's patterns, but for the header's masked form (the forced failure quotes the header on purpose).
        unmasked = SECRET_PATTERNS.search("\n".join(lines).replace("X-Payment-Token: ***", ""))
        assert unmasked is None, f"{name}: {unmasked}"
    assert any(r["message"].endswith(" ready.") for r in records), "the ready line is a record too"
    chunk_lines = [r for r in records if r.get("task") == PROCESS_CHUNK and r.get("outcome") == "succeeded"
                   and r.get("run_id") == run_id]
    assert sorted(r["chunk"] for r in chunk_lines) == [0, 1, 2], "a succeeded line per chunk, with its run"
    assert all(r["args"] == f"[chunk {run_id}/{r['chunk']}: 4 images]" for r in chunk_lines)
    # Whatever is logged inside a chunk task (irlive's lines and Celery's own) carries its run and chunk.
    inside = [r for r in records if r.get("task") == PROCESS_CHUNK and r["logger"] != "celery.worker.strategy"]
    assert inside and all(r.get("run_id") in (run_id, broken) and "chunk" in r for r in inside), inside
    # A line logged by one of a chunk's calls (each runs on a thread of its own) carries the task and its run.
    (refused, *_) = [r for r in records if "could not download the images of a call" in r["message"]]
    assert refused["thread"].startswith("irlive-call"), refused
    assert (refused["task"], refused["run_id"]) == (PROCESS_CHUNK, run_id) and refused["task_id"] and "chunk" in refused
    (failure, *_) = [r for r in records if "unexpected failure" in r["message"]]
    assert failure["run_id"] == broken and failure["level"] == "ERROR" and failure["logger"] == "irlive.tasks"
    assert "ValueError: invalid literal for int() with base 10: 'redis://***@127.0.0.1:" in failure["exc_info"]
    assert_no_secret("the output bucket", all_output_text(stack), secrets)


def _fail_a_chunk_quoting(stack: Stack, url: str, text: str) -> str:
    """A --force run whose created_ms is `text`: its chunk task fails with a ValueError quoting it (an
    exception irlive does not know: logged with its traceback). Returns the run's id."""
    settings = Settings.from_env({**stack.env, "IRLIVE_REDIS_URL": url})
    keys = Keys(settings.key_prefix)
    store = Store.from_url(url)
    app = make_app(settings)
    try:
        sample = Sample("logs/img_00.png", b"", "live")
        etag = stack.s3_client().head_object(Bucket=IN_BUCKET, Key=sample.key)["ETag"].strip('"')
        runs = Runs(store, keys)
        run_id = f"logs-{uuid.uuid4().hex[:8]}"
        runs.create(run_id, source=f"s3://{IN_BUCKET}/logs", output=str(settings.require_output()),
                    settings={"force": True})
        seq = runs.add_chunk(run_id, [(sample.key, etag)])
        runs.listing_finished(run_id)
        store.hset(keys.run(run_id), "created_ms", text)
        send_chunk(app, Chunk(run_id, seq, IN_BUCKET, [(sample.key, etag)]))
        return run_id
    finally:
        app.close()
        store.close()


@pytest.mark.integration
def test_a_worker_and_a_scan_log_text_unless_json_is_asked_for(clean_stack: Stack, irlive: IrliveRunner) -> None:
    """No IRLIVE_LOG_FORMAT, and neither stderr a terminal (a file, a pipe): text, as a CLI's is; and Celery's
    root paragraph is not repeated on every start (the tests run as root here)."""
    upload(clean_stack, [Sample(f"plain/img_{i}.png", png(128, 128, "live", seed=40 + i), "live") for i in range(2)])
    worker = clean_stack.start_worker()
    scanned = irlive("scan", f"s3://{IN_BUCKET}/plain", "--wait", timeout=120)
    assert scanned.returncode == 0, scanned.stderr
    clean_stack.stop_workers()
    text = worker.log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert any("ready." in line for line in lines), text
    assert [line for line in lines if line.lstrip().startswith("{")] == [], "a JSON line nobody asked for"
    assert [line for line in scanned.stderr.splitlines() if line.lstrip().startswith("{")] == []
    assert "superuser privileges" not in text
    # As root, JSON asked for: the root line is INFO, not a WARNING record on every start.
    json_worker = clean_stack.start_worker(extra_env={"IRLIVE_LOG_FORMAT": "json"})
    clean_stack.stop_workers()
    warned = [line for line in json_worker.log.read_text().splitlines()
              if "runs as root" in line and json.loads(line).get("level") == "WARNING"]
    assert warned == []


def test_a_broker_retry_is_one_line_at_most_every_30_s() -> None:
    import redis

    line = logs.BrokerRetryLine(every_s=30.0)
    refused = redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
    oom = _record("maybe_refresh_binding_expiry: Redis error, will retry", exc=_raised_as(refused))
    assert line.filter(oom) is True
    assert oom.exc_info is None and "OutOfMemoryError" in oom.getMessage() and "maxmemory" in oom.getMessage()
    again = _record("maybe_refresh_binding_expiry: Redis error, will retry",
                    exc=_raised_as(redis.exceptions.OutOfMemoryError("again")))
    assert line.filter(again) is False, "said once per 30 s"
    other = _record("Redis connection lost", exc=_raised_as(ValueError("not redis")))
    assert line.filter(other) is True and other.exc_info is not None, "anything else is left as it is"


def _raised_as(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught
