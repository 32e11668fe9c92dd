"""A Redis that would forget money is refused by `scan` and by workers, unless volatile Redis is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET
from tests.faults import live_samples, upload_samples

ROOT = Path(__file__).resolve().parents[1]
ALLOW = {"IRLIVE_ALLOW_VOLATILE_REDIS": "true"}


def _worker(stack: Stack, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "threads", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        env={**os.environ, **stack.env, **env}, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def test_scan_and_workers_refuse_a_redis_that_keeps_nothing(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload_samples(clean_stack, live_samples(3, "volatile"))
    clean_stack.restart_redis(appendonly=False)  # --appendonly no --save "": what many installs default to

    refused = irlive("scan", f"s3://{IN_BUCKET}/volatile", "--json")
    assert refused.returncode == 2, refused.stderr
    assert "appendonly" in refused.stderr and "IRLIVE_ALLOW_VOLATILE_REDIS" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert clean_stack.redis_client().zcard("irlive:runs") == 0, "nothing was created"

    worker = _worker(clean_stack, {})
    assert worker.returncode == 2, worker.stdout + worker.stderr
    assert "appendonly" in worker.stderr and "ready." not in worker.stdout + worker.stderr

    allowed = irlive("scan", f"s3://{IN_BUCKET}/volatile", "--json", env=ALLOW)
    assert allowed.returncode == 0, allowed.stderr
    assert "volatile" in allowed.stderr
    assert json.loads(allowed.stdout)["found"] == 3


def test_an_evicting_redis_is_refused(clean_stack: Stack, irlive: IrliveRunner) -> None:
    client = clean_stack.redis_client()
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        refused = irlive("scan", f"s3://{IN_BUCKET}/x", "--json")
    finally:
        client.config_set("maxmemory-policy", "noeviction")
    assert refused.returncode == 2, refused.stderr
    assert "maxmemory-policy allkeys-lru" in refused.stderr and "noeviction" in refused.stderr


def test_a_durable_redis_is_accepted_without_a_word(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload_samples(clean_stack, live_samples(2, "durable"))
    done = irlive("scan", f"s3://{IN_BUCKET}/durable", "--json")
    assert done.returncode == 0, done.stderr
    assert "volatile" not in done.stderr and "durability" not in done.stderr
