"""Secrets never leak, through real processes: a Redis password, an API key, payment tokens and presigned
signatures appear in no manifest, run record, broker message, CLI output or worker log line, tracebacks
included.

The private Redis gets an ACL user with a password; the worker, the CLI and this test reach it through
`redis://irlive-app:<password>@...`, and the sandbox refuses calls without the API key.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest
import redis

from sandbox.images import Sample, png
from sandbox.stack import Stack, WorkerProc
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, X402_ENV, X402_KEY, X402_SECRET, all_output_text, payment_tokens, upload
from worker.app import make_app
from worker.config import Settings
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.messages import FINALIZE_RUN, PROCESS_CHUNK, Chunk
from worker.seams.store import Store

pytestmark = pytest.mark.integration

REDIS_USER = "irlive-app"
REDIS_PASSWORD = "s3cretPassw0rd"
API_KEY = "sk-live-irlive-7f3e9a1c5b"
BROKER_KEYS = ("irlive.nightly", "unacked")
TRACEBACK_HEAD = "Traceback (most recent call last)"
# A presigned URL's credential with its value still there (the workers' own signatures are not known here).
UNMASKED_SIGNATURE = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId)=(?!\*\*\*)[^&\s\"']+")


@dataclass
class BrokerTap:
    """Samples the Celery queue, the unacked hash (messages held by a worker) and the payment tokens in the
    wallet (spent ones do not stay there) until stopped."""

    client: redis.Redis
    seen: dict[str, str] = field(default_factory=dict)
    unacked: int = 0
    tokens: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def take(self) -> None:
        for raw in self.client.lrange("irlive.nightly", 0, -1):
            self.seen.setdefault(_s(raw), "queue")
        for raw in self.client.hvals("unacked"):
            if _s(raw) not in self.seen:
                self.seen[_s(raw)] = "unacked"
                self.unacked += 1
        for key in self.client.scan_iter("irlive:pay:*"):
            token = self.client.hget(key, "token")
            if token:
                self.tokens.add(_s(token))

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self.take()
                self._stop.wait(0.01)

        self._thread = threading.Thread(target=loop, name="broker-tap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.take()
        self.client.close()

    def texts(self) -> list[str]:
        """Each message as stored, and its body decoded (kombu keeps the task arguments base64-encoded)."""
        out: list[str] = []
        for raw in self.seen:
            stored = json.loads(raw)
            payload = stored[0] if isinstance(stored, list) else stored
            body = payload["body"]
            if payload.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body).decode()
            out += [raw, body]
        return out


@pytest.fixture
def acl_user(clean_stack: Stack) -> Iterator[str]:
    """The URL of a Redis ACL user with a password (the default user stays open for the stack's own use)."""
    admin = clean_stack.redis_client()
    admin.acl_setuser(REDIS_USER, enabled=True, passwords=[f"+{REDIS_PASSWORD}"], keys=["*"], channels=["*"],
                      commands=["+@all"], reset=True)
    url = clean_stack.redis_url.replace("redis://", f"redis://{REDIS_USER}:{REDIS_PASSWORD}@", 1)
    try:
        yield url
    finally:
        admin.acl_deluser(REDIS_USER)
        admin.close()


def assert_no_secret(where: str, text: str, secrets: list[str]) -> None:
    found = [s for s in secrets if s in text]
    assert found == [], f"{where} holds a secret: {found}"
    signature = UNMASKED_SIGNATURE.search(text)
    assert signature is None, f"{where} holds a presigned URL's credential ({signature.group(1)}=...)"


def _cli(irlive: IrliveRunner, env: dict[str, str], *args: str, timeout: float = 120) -> \
        subprocess.CompletedProcess[str]:
    done = irlive(*args, env=env, timeout=timeout)
    assert done.returncode == 0, f"irlive {' '.join(args)}: {done.stderr}"
    return done


def _presigned_signature(stack: Stack, key: str) -> str:
    url = stack.s3_client().generate_presigned_url("get_object", Params={"Bucket": IN_BUCKET, "Key": key},
                                                   ExpiresIn=900)
    return dict(parse_qsl(urlsplit(str(url)).query))["X-Amz-Signature"]


def _worker_logs(stack: Stack) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace") for p in sorted(Path(stack.workdir).glob("w*.log"))}


def test_no_secret_leaks_from_a_password_protected_run(clean_stack: Stack, irlive: IrliveRunner,
                                                        acl_user: str) -> None:
    stack = clean_stack
    env = {"IRLIVE_REDIS_URL": acl_user, "IRLIVE_API_KEY": API_KEY, "IRLIVE_CHUNK_SIZE": "4"}
    # Slow calls keep each chunk's message unacked long enough to be seen in flight.
    stack.sandbox_config(api_key=API_KEY, latency_ms=300)
    samples = [Sample(f"secrets/img_{i:02d}.png", png(256, 256, "live", seed=500 + i), "live") for i in range(10)]
    upload(stack, samples)
    admin = stack.redis_client()
    cli_out: list[str] = []

    # Enqueued with no worker running: the chunk messages wait in the queue, where the tap reads them.
    tap = BrokerTap(redis.Redis.from_url(acl_user))
    scanned = _cli(irlive, env, "scan", f"s3://{IN_BUCKET}/secrets", "--json")
    cli_out += [scanned.stdout, scanned.stderr]
    run_id: str = json.loads(scanned.stdout)["run_id"]
    tap.take()
    assert len(tap.seen) == 3, "10 images in chunks of 4"
    tap.start()
    try:
        worker = stack.start_worker(extra_env=env)
        waited = _cli(irlive, env, "status", run_id, "--wait", "--json", "--timeout", "120", timeout=150)
    finally:
        tap.stop()
    assert json.loads(waited.stdout)["state"] == "done", waited.stdout
    assert tap.unacked >= 1, "no message was seen while a worker held it"
    users = {c.get("user") for c in admin.client_list()}
    assert REDIS_USER in users, "the worker must reach Redis as the ACL user"
    cli_out += [waited.stdout, waited.stderr]
    for args in (("status", run_id), ("wallet",), ("wallet", "--json")):
        done = _cli(irlive, env, *args)
        cli_out += [done.stdout, done.stderr]

    tokens = sorted(tap.tokens | set(payment_tokens(stack)))
    assert len(tokens) >= stack.sandbox_ledger()["tokens_consumed"] >= 3, "three chunks, one paid call each"
    signature = _presigned_signature(stack, samples[0].key)
    secrets = [REDIS_PASSWORD, API_KEY, signature, *tokens]

    assert_no_secret("the output bucket", all_output_text(stack), secrets)
    run_hash = admin.hgetall(f"irlive:run:{run_id}")
    assert run_hash, "the run record"
    assert_no_secret("the run record", json.dumps({_s(k): _s(v) for k, v in run_hash.items()}), secrets)
    assert_no_secret("the CLI's output", "\n".join(cli_out), secrets)
    for text in tap.texts():
        assert_no_secret("a broker message", text, secrets)
    # The wallet's payment records are where tokens live; nothing else in Redis may hold one, or a password.
    for key in admin.scan_iter("irlive:*"):
        if _s(key).startswith("irlive:pay:"):
            continue
        assert_no_secret(f"Redis key {_s(key)!r}", json.dumps(_dump(admin, _s(key))), secrets)
    for name, text in _worker_logs(stack).items():
        assert_no_secret(f"worker log {name}", text, secrets)

    _force_tracebacks(stack, worker, acl_user, secrets, tokens[0], signature, samples[0])
    admin.close()


def _force_tracebacks(stack: Stack, worker: WorkerProc, url: str, secrets: list[str], token: str,
                      signature: str, sample: Sample) -> None:
    """Two failures that print tracebacks carrying secrets into the worker log, as a damaged run record makes
    them: an exception irlive does not know (logged with log.exception by the chunk task) and an irlive error
    escaping the finalize task (logged by Celery itself: "Task ... raised unexpected")."""
    settings = Settings.from_env({**stack.env, "IRLIVE_REDIS_URL": url})
    keys = Keys(settings.key_prefix)
    store = Store.from_url(url)
    etag = stack.s3_client().head_object(Bucket=IN_BUCKET, Key=sample.key)["ETag"].strip('"')
    app = make_app(settings)
    try:
        runs = Runs(store, keys)
        # A --force run whose created_ms is not a number: the chunk task fails with a ValueError quoting it.
        bad_ms = f"{url} X-Payment-Token: {token} api_key={API_KEY}"
        assert len(repr(bad_ms)) < 200, "int() quotes at most 200 characters"
        chunk_run = f"secrets-{uuid.uuid4().hex[:8]}"
        runs.create(chunk_run, source=f"s3://{IN_BUCKET}/secrets", output=str(settings.require_output()),
                    settings={"force": True})
        seq = runs.add_chunk(chunk_run, [(sample.key, etag)])
        runs.listing_finished(chunk_run)
        store.hset(keys.run(chunk_run), "created_ms", bad_ms)
        app.send_task(PROCESS_CHUNK, args=[Chunk(chunk_run, seq, IN_BUCKET, [(sample.key, etag)]).to_message()])

        # A run whose output is a URL with credentials and a signature: finalize raises ConfigError quoting it.
        final_run = f"secrets-{uuid.uuid4().hex[:8]}"
        runs.create(final_run, source=f"s3://{IN_BUCKET}/secrets", settings={},
                    output=f"https://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1/out?X-Amz-Signature={signature}")
        app.send_task(FINALIZE_RUN, args=[final_run])

        def both_logged() -> bool:
            text = worker.log.read_text(errors="replace")
            return "unexpected failure" in text and "raised unexpected: ConfigError" in text

        _wait(both_logged, 60, "the two failures in the worker log", worker)
        # The chunk fails again on its redelivery and is dead-lettered: its error reaches Redis and S3.
        _wait(lambda: store.hget(keys.run(chunk_run), "state") == "done", 90, "the damaged run to end", worker)
    finally:
        app.close()
        store.close()

    log = worker.log.read_text(errors="replace")
    assert log.count(TRACEBACK_HEAD) >= 2
    for name, text in _worker_logs(stack).items():
        assert_no_secret(f"worker log {name} (tracebacks)", text, secrets)
    # The tracebacks' last lines, redacted: still saying what failed.
    assert "\nValueError: invalid literal for int() with base 10: 'redis://***@127.0.0.1:" in log
    assert "\nworker.errors.ConfigError: run output: expected s3://bucket/prefix, got 'https://***@127.0.0.1/out?***'" \
        in log
    admin = stack.redis_client()
    dead = [json.loads(e) for e in admin.lrange("irlive:dlq", 0, -1)]
    assert [d["run_id"] for d in dead] == [chunk_run]
    assert "ValueError" in dead[0]["last_error"]
    assert_no_secret("the dead-letter queue", json.dumps(dead), secrets)
    assert_no_secret("the output bucket (dead-lettered chunk)", all_output_text(stack), secrets)


def _dump(client: redis.Redis, key: str) -> object:
    """A key's whole value as text, whatever its type."""
    kind = _s(client.type(key))
    if kind == "hash":
        return {_s(k): _s(v) for k, v in client.hgetall(key).items()}
    if kind == "list":
        return [_s(v) for v in client.lrange(key, 0, -1)]
    if kind == "set":
        return sorted(_s(v) for v in client.smembers(key))
    if kind == "zset":
        return [_s(v) for v in client.zrange(key, 0, -1)]
    if kind == "string":
        return _s(client.get(key))
    return kind


def _s(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _wait(predicate: Callable[[], bool], timeout: float, what: str, worker: WorkerProc) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert worker.alive(), f"the worker died waiting for {what}"
        if time.monotonic() > deadline:
            tail = worker.log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"{what}: not after {timeout:.0f} s\n{tail}")
        time.sleep(0.1)


def test_no_x402_key_or_signature_leaks(clean_stack: Stack, irlive: IrliveRunner, acl_user: str) -> None:
    """Paying by x402: the payer's key and every signature (the EIP-712 signature, the base64 payment header that
    carries it) appear in no manifest, run or payment record, broker message, Redis value, CLI output (`irlive
    config` masks the key) or worker log; the ledger keeps the payer, nonce and transaction, which are public."""
    stack = clean_stack
    env = {"IRLIVE_REDIS_URL": acl_user, "IRLIVE_CHUNK_SIZE": "4", **X402_ENV}
    stack.sandbox_config(latency_ms=300)
    samples = [Sample(f"x402/img_{i:02d}.png", png(256, 256, "live", seed=700 + i), "live") for i in range(10)]
    upload(stack, samples)
    tap = BrokerTap(redis.Redis.from_url(acl_user))
    scanned = _cli(irlive, env, "scan", f"s3://{IN_BUCKET}/x402", "--json")
    run_id: str = json.loads(scanned.stdout)["run_id"]
    cli_out = [scanned.stdout, scanned.stderr]
    tap.take()
    tap.start()
    try:
        stack.start_worker(extra_env=env)
        waited = _cli(irlive, env, "status", run_id, "--wait", "--json", "--timeout", "120", timeout=150)
    finally:
        tap.stop()
    assert json.loads(waited.stdout)["state"] == "done", waited.stdout
    cli_out += [waited.stdout, waited.stderr]
    for args in (("status", run_id), ("wallet",), ("wallet", "--json"), ("config", "--json"), ("config",)):
        done = irlive(*args, env=env)
        cli_out += [done.stdout, done.stderr]
    config = json.loads(irlive("config", "--json", env=env).stdout)
    assert config["settings"]["IRLIVE_X402_PRIVATE_KEY"]["value"] == "***"
    settled = stack.sandbox_ledger()["x402_settlements"]
    assert len(settled) == 3, "three chunks, one signed call each"

    def clean(where: str, text: str) -> None:
        assert_no_secret(where, text, [X402_KEY, X402_KEY[2:]])
        found = X402_SECRET.search(text)
        assert found is None, f"{where} holds a key or a signature ({found.group(0)[:12]}...)"

    clean("the output bucket", all_output_text(stack))
    clean("the CLI's output", "\n".join(cli_out))
    for text in tap.texts():
        clean("a broker message", text)
    admin = stack.redis_client()
    for key in admin.scan_iter("*"):
        clean(f"Redis key {_s(key)!r}", json.dumps(_dump(admin, _s(key))))
    archived = all_output_text(stack)
    assert all(s["transaction"] in archived and s["payer"] in archived for s in settled), \
        "the archived ledger names each settlement's transaction and payer"
    for name, text in _worker_logs(stack).items():
        clean(f"worker log {name}", text)
    admin.close()
