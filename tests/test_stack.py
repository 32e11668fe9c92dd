"""The local stack launcher: services answer, Redis survives restarts, workers start and die, stop leaves nothing."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import pytest
from celery import Celery

from sandbox import procs
from sandbox.procs import wait_until
from sandbox.stack import Stack

pytestmark = pytest.mark.integration


def _gone(pid: int) -> bool:
    """True once no process of the group led by `pid` exists (leaders are reaped by the stack)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _pong_names(stack: Stack) -> set[str]:
    app = Celery(broker=stack.redis_url)
    try:
        replies = app.control.ping(timeout=1.0)
    finally:
        app.close()
    return {name for reply in replies for name in reply}


def test_env_names_every_service(clean_stack: Stack) -> None:
    env = clean_stack.env
    assert env["IRLIVE_REDIS_URL"] == clean_stack.redis_url
    assert env["IRLIVE_S3_ENDPOINT_URL"] == clean_stack.s3_endpoint
    assert env["IRLIVE_MARKETPLACE_URL"] == clean_stack.sandbox_url
    assert env["IRLIVE_OUTPUT"] == "s3://irlive-out/results"
    assert env["AWS_ACCESS_KEY_ID"] == "testing"


def test_redis_pings(clean_stack: Stack) -> None:
    r = clean_stack.redis_client()
    assert r.ping()
    assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_s3_put_get_and_presigned_get(clean_stack: Stack) -> None:
    s3 = clean_stack.s3_client()
    key = "captures/a b+ü(1).jpg"
    s3.put_object(Bucket="irlive-in", Key=key, Body=b"\xff\xd8\xff payload")
    assert s3.get_object(Bucket="irlive-in", Key=key)["Body"].read() == b"\xff\xd8\xff payload"
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "irlive-in", "Key": key}, ExpiresIn=60)
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200
    assert got.content == b"\xff\xd8\xff payload"


def test_clean_stack_resets_s3_and_sandbox(clean_stack: Stack) -> None:
    names = {b["Name"] for b in clean_stack.s3_client().list_buckets()["Buckets"]}
    assert names == {"irlive-in", "irlive-out"}
    ledger = clean_stack.sandbox_ledger()
    assert ledger["calls_total"] == 0
    assert clean_stack.sandbox_config(latency_ms=5)["latency_ms"] == 5


def test_restart_redis_keeps_data_with_aof(clean_stack: Stack) -> None:
    r = clean_stack.redis_client()
    r.set("survives", "1")
    port = clean_stack.redis_url
    # The session stack runs without AOF: restart_redis turns it on live before the SIGKILL.
    clean_stack.restart_redis(appendonly=True, hard=True)
    assert clean_stack.redis_url == port
    assert r.get("survives") == b"1"
    r.set("also", "2")
    clean_stack.restart_redis(appendonly=True, hard=False)
    assert r.mget("survives", "also") == [b"1", b"2"]
    clean_stack.restart_redis(appendonly=False)
    assert r.get("survives") is None


def test_worker_starts_answers_and_dies_with_sigkill(clean_stack: Stack) -> None:
    w = clean_stack.start_worker(concurrency=2)
    assert w.alive()
    assert f"{w.name}@" in " ".join(_pong_names(clean_stack))
    clean_stack.kill_worker(w, signal.SIGKILL)
    assert not w.alive()
    assert _gone(w.pid)
    assert w not in clean_stack.workers


def test_own_stack_with_aof_and_worker_stops_everything(tmp_path: Path) -> None:
    with Stack(tmp_path / "own", workers=1, concurrency=2, redis_appendonly=True) as s:
        assert set(s.pids()) == {"redis", "moto", "sandbox", "w1"}
        s.redis_client().set("k", "v")
        s.restart_redis(appendonly=True, hard=True)
        assert s.redis_client().get("k") == b"v"
        # The worker reconnects to the same port on its own; celery's first retry comes after 2 s.
        wait_until(lambda: "w1@" in " ".join(_pong_names(s)), 20, "w1 answering after the Redis restart")
        pids = s.pids()
        os.killpg(pids["moto"], signal.SIGKILL)  # stop() must not mind a service that already died
    assert all(_gone(pid) for pid in pids.values()), pids
    s.stop()  # a second stop is a no-op


def test_start_failure_names_the_service_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IRLIVE_REDIS_SERVER", "/bin/false")
    s = Stack(tmp_path / "bad")
    with pytest.raises(RuntimeError, match="redis"):
        s.start()
    assert s.pids() == {}


def test_port_taken_between_pick_and_bind_is_retried_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        real = procs.free_port
        picks = iter([busy, busy, busy])
        monkeypatch.setattr(procs, "free_port", lambda: next(picks, None) or real())
        with Stack(tmp_path / "clash") as s:
            assert not any(f":{busy}" in url for url in (s.redis_url, s.s3_endpoint, s.sandbox_url))
            assert s.redis_client().ping()
            assert "in use" in s.log_path("moto").read_text()
