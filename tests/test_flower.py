"""Flower works: the workers send task events and heartbeats, and a real Flower (`celery -A worker flower`, as
deploy/ runs it) lists the stack's workers as online and a run's chunk tasks, named and summarised, never a key
or a secret."""

from __future__ import annotations

import json
import os
import secrets
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox import procs
from sandbox.images import Sample, png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, SECRET_PATTERNS, payment_tokens, upload
from worker.app import make_app
from worker.config import Settings
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.messages import FINALIZE_RUN, PROCESS_CHUNK
from worker.seams.store import Store

API_KEY = "sk-live-irlive-flower-2b9d"
PASSWORD = "fl0werS3cretPw"
FLOWER_START_S = 30.0
# Events travel by Redis pub/sub as they happen; Flower sees a run's tasks within a second or two of them.
SEEN_S = 30.0


def test_the_app_sends_task_events() -> None:
    conf = make_app(Settings()).conf
    assert conf.worker_send_task_events is True and conf.task_send_sent_event is True


class _Producer:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def publish(self, event: dict[str, Any], **_: Any) -> None:
        self.events.append(event)


def test_task_events_are_redacted_before_they_leave_the_process() -> None:
    """A failure's exception and traceback travel in task events to Flower: redacted like a log line."""
    dispatcher = make_app(Settings()).events.Dispatcher(enabled=False)
    producer = _Producer()
    dispatcher.enabled, dispatcher.producer = True, producer
    dispatcher.send("task-failed", uuid="t1", exception=f"ValueError('redis://u:{PASSWORD}@h:6379/0')",
                    traceback="Traceback (most recent call last):\nX-Payment-Token: ptok_1 api_key=sk-1")
    dispatcher.publish("task-sent", {"uuid": "t2", "args": "[chunk r/1: 3 images]", "kwargs": "{}"}, producer)
    failed, sent = producer.events
    assert failed["exception"] == "ValueError('redis://***@h:6379/0')" and failed["uuid"] == "t1"
    assert "ptok_1" not in failed["traceback"] and "sk-1" not in failed["traceback"]
    assert sent["args"] == "[chunk r/1: 3 images]" and sent["type"] == "task-sent"


@dataclass
class Flower:
    url: str
    auth: tuple[str, str]
    proc: procs.Proc
    log: Path

    def get(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}{path}", params=params, auth=self.auth, timeout=10)
        r.raise_for_status()
        return r.json()

    def until(self, what: str, predicate: Any, timeout: float = SEEN_S) -> None:
        procs.wait_until(predicate, timeout, what, log=self.log, proc=self.proc, interval=0.2)


@pytest.fixture
def flower(clean_stack: Stack, tmp_path: Path) -> Iterator[Flower]:
    """Flower on a free port against the stack's Redis, with the workers' settings, behind basic auth (its API
    answers only with auth, or with FLOWER_UNAUTHENTICATED_API)."""
    port = procs.free_port()
    auth = ("irlive", secrets.token_hex(8))
    cmd = [sys.executable, "-m", "celery", "-A", "worker", "flower", "--address=127.0.0.1", f"--port={port}",
           "--enable_events=False", f"--basic_auth={auth[0]}:{auth[1]}"]
    log = tmp_path / "flower.log"
    proc = procs.spawn(cmd, log, env={**os.environ, **clean_stack.env}, cwd=Path(__file__).resolve().parents[1])
    try:
        procs.wait_until(lambda: procs.http_ok(f"http://127.0.0.1:{port}/healthcheck"), FLOWER_START_S,
                         "flower", log=log, proc=proc, interval=0.1)
        yield Flower(f"http://127.0.0.1:{port}", auth, proc, log)
    finally:
        procs.kill_group(proc, timeout=10)


@pytest.mark.integration
def test_flower_lists_the_workers_and_the_chunk_tasks_of_a_run(clean_stack: Stack, flower: Flower,
                                                              irlive: IrliveRunner) -> None:
    stack = clean_stack
    env = {"IRLIVE_API_KEY": API_KEY, "IRLIVE_CHUNK_SIZE": "4"}
    stack.sandbox_config(api_key=API_KEY)
    workers = [stack.start_worker(extra_env=env, concurrency=4) for _ in range(2)]
    names = {f"{w.name}@{os.uname().nodename}" for w in workers}

    # Online by their heartbeats (Flower's events state): also proves Flower hears the events before the run.
    flower.until("both workers online in Flower", lambda: {
        n for n, alive in flower.get("/api/workers", status="true").items() if alive} >= names)
    # And through its inspect broadcast: each worker answers with its registered tasks.
    listed = flower.get("/api/workers", refresh="true")
    assert names <= set(listed), listed.keys()
    for name in names:
        assert {PROCESS_CHUNK, FINALIZE_RUN} <= set(listed[name]["registered"])

    samples = [Sample(f"flower/img_{i:02d}.png", png(256, 256, "live", seed=900 + i), "live") for i in range(12)]
    upload(stack, samples)
    scanned = irlive("scan", f"s3://{IN_BUCKET}/flower", "--json", env=env)
    assert scanned.returncode == 0, scanned.stderr
    run_id: str = json.loads(scanned.stdout)["run_id"]
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "60", env=env, timeout=90)
    assert json.loads(waited.stdout)["state"] == "done", waited.stdout + waited.stderr

    def chunk_tasks() -> dict[str, Any]:
        found: dict[str, Any] = flower.get("/api/tasks", taskname=PROCESS_CHUNK)
        return {k: t for k, t in found.items() if run_id in (t.get("args") or "")}

    flower.until("the run's three chunks succeeded in Flower", lambda: sorted(
        t["state"] for t in chunk_tasks().values()) == ["SUCCESS"] * 3)
    tasks = chunk_tasks()
    assert sorted(t["args"] for t in tasks.values()) == [f"[chunk {run_id}/{seq}: 4 images]" for seq in range(3)]
    assert {t["worker"] for t in tasks.values()} <= names
    assert all(t["kwargs"] == "{}" and t["sent"] for t in tasks.values()), "task-sent events from the producer"
    flower.until("the run's finalize task in Flower", lambda: any(
        t["state"] == "SUCCESS" and run_id in (t.get("args") or "")
        for t in flower.get("/api/tasks", taskname=FINALIZE_RUN).values()))

    # A task that fails quoting a password (finalize of a run whose output URL carries credentials): Flower
    # shows the failure, redacted.
    bad_run = f"flower-{uuid.uuid4().hex[:8]}"
    store = Store.from_url(stack.redis_url)
    app = make_app(Settings.from_env(stack.env))
    try:
        Runs(store, Keys("irlive")).create(bad_run, source=f"s3://{IN_BUCKET}/flower", settings={},
                                           output=f"https://irlive:{PASSWORD}@127.0.0.1/out?X-Amz-Signature=abc")
        app.send_task(FINALIZE_RUN, args=[bad_run])
    finally:
        app.close()
        store.close()

    def failed() -> list[dict[str, Any]]:
        return [t for t in flower.get("/api/tasks", taskname=FINALIZE_RUN, state="FAILURE").values()
                if bad_run in (t.get("args") or "")]

    flower.until("the failed finalize task in Flower", lambda: bool(failed()))
    (failure,) = failed()
    assert "ConfigError" in failure["exception"] and "https://***@127.0.0.1/out" in failure["exception"]
    assert "ConfigError" in failure["traceback"]

    # What Flower shows and logs: no image key, no API key, no payment token, no password or signature.
    shown = json.dumps(flower.get("/api/tasks")) + json.dumps(flower.get("/api/workers"))
    shown += flower.log.read_text(errors="replace")
    leaked = [s for s in (API_KEY, PASSWORD, *payment_tokens(stack), *(s.key for s in samples)) if s in shown]
    assert leaked == [] and SECRET_PATTERNS.search(shown) is None, leaked
