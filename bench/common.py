"""Shared benchmark plumbing: a local stack, fast synthetic uploads, one driven run, and what it left behind."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import redis
from botocore.config import Config

from sandbox.config import SandboxConfig
from sandbox.images import png
from sandbox.procs import wait_until
from sandbox.stack import AWS_ENV, Stack
from worker.flow.runs import Runs, RunStatus
from worker.keys import Keys
from worker.seams.store import Store

IN_BUCKET = "bench-in"
OUT_BUCKET = "bench-out"
OUTPUT = f"s3://{OUT_BUCKET}/results"
IRLIVE_BIN = Path(sys.executable).parent / "irlive"
UPLOAD_THREADS = 16
SAMPLE_INTERVAL_S = 0.05
STATUS_INTERVAL_S = 0.2
KEYS = Keys("irlive")
# The baseline's Celery rate_limit (calls/s), which Celery enforces per worker process (celery issue 5732).
RATE_ENV = "IRLIVE_BENCH_CELERY_RATE"
# irlive's own limiter set this high (and not adaptive) is out of the baseline's way.
NEUTRAL_RATE = 10_000.0
# Synthetic truths cycled over the corpus: every one of them is a billed, judged call.
TRUTHS = ("live", "spoof", "live", "no_face")


def keep_bytecode() -> None:
    """Let the processes a benchmark starts (workers, CLI runs, servers) write and reuse compiled bytecode.

    Some machines set PYTHONDONTWRITEBYTECODE (this project's does; dev.sh unsets it for the tests): every
    process then compiles each module it imports, which on the project machine put ~1.5 s of compiling into
    every `irlive scan` and lazily imported modules into the workers' measured CPU (a run's first paid call
    4.8-5.8 s after the scan instead of 2.7-3.3 s). Called first by each benchmark's main."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def base_env(**extra: str) -> dict[str, str]:
    """Settings every benchmark stack shares; the scenario's own settings are added per worker and per scan."""
    return {"IRLIVE_OUTPUT": OUTPUT, **extra}


def s3_client(stack: Stack, pool: int = UPLOAD_THREADS, endpoint: str | None = None) -> Any:
    """A client of the stack's S3 (moto_server), or of `endpoint` (another stand-in) with the same keys."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint or stack.s3_endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, max_pool_connections=pool),
    )


def upload_images(stack: Stack, n: int, prefix: str = "bench", endpoint: str | None = None) -> list[str]:
    """Create the buckets and put n distinct 64x64 PNG captures under prefix, in parallel; returns their keys."""
    s3 = s3_client(stack, endpoint=endpoint)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", ())}
    for bucket in (IN_BUCKET, OUT_BUCKET):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
    keys = [f"{prefix}/img_{i:06d}.png" for i in range(n)]

    def put(i: int) -> None:
        s3.put_object(Bucket=IN_BUCKET, Key=keys[i], Body=png(64, 64, TRUTHS[i % len(TRUTHS)], seed=i))

    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, range(n)))
    return keys


def source(prefix: str = "bench") -> str:
    return f"s3://{IN_BUCKET}/{prefix}"


def reset(stack: Stack, **sandbox: Any) -> None:
    """No workers, an empty Redis (broker, runs, done-set, wallet, limiter), a fresh sandbox configured as given."""
    stack.stop_workers()
    client = stack.redis_client()
    try:
        client.flushall()
    finally:
        client.close()
    stack.reset_sandbox()
    stack.sandbox_config(**{**dataclasses.asdict(SandboxConfig()), **sandbox})


def start_workers(stack: Stack, n: int, concurrency: int, env: Mapping[str, str], app: str = "worker") -> None:
    for _ in range(n):
        stack.start_worker(extra_env=env, concurrency=concurrency, app=app)


def run_cli(stack: Stack, env: Mapping[str, str], *args: str, timeout: float = 300.0) -> dict[str, Any]:
    """Run `irlive ... --json` against the stack and return its JSON answer; raise with its stderr on failure."""
    done = subprocess.run([str(IRLIVE_BIN), *args], env={**os.environ, **stack.env, **env}, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"irlive {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


@dataclass(frozen=True)
class Sample:
    """The wallet's spent-token count and the limiter's effective rate at one moment (monotonic seconds)."""

    t: float
    spent: int
    rate: float | None


class Sampler:
    """Reads two Redis counters every SAMPLE_INTERVAL_S in a thread, until stopped or max_s has passed."""

    def __init__(self, redis_url: str, max_s: float) -> None:
        self._client = redis.Redis.from_url(redis_url, decode_responses=True)
        self._stop = threading.Event()
        self._max_s = max_s
        self.samples: list[Sample] = []
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._client.close()

    def _loop(self) -> None:
        deadline = time.monotonic() + self._max_s
        while time.monotonic() < deadline:
            spent = self._client.hget(KEYS.wallet_totals(), "spent")
            rate = self._client.hget(KEYS.ratelimit_state(), "rate")
            self.samples.append(Sample(time.monotonic(), int(spent or 0), float(rate) if rate else None))
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return


@dataclass
class DrivenRun:
    """One run, scanned through the CLI and followed until it stopped."""

    run_id: str
    status: RunStatus
    scan: dict[str, Any]
    wall_s: float
    samples: list[Sample] = field(default_factory=list)
    # time.monotonic() when the scan command started: samples' times are on the same clock.
    started: float = 0.0
    # The commands the benchmark itself sent meanwhile (its sampler's two HGETs, each status poll's HGETALL):
    # taken out of Redis's counts, which are irlive's.
    own_commands: Counter[str] = field(default_factory=Counter)

    def time_at(self, spent: int) -> float | None:
        """When the wallet's spent count first reached `spent` (to within one sampling interval)."""
        return next((s.t for s in self.samples if s.spent >= spent), None)

    def rate_between(self, first: int, last: int) -> float:
        """Calls per second between the first-th and the last-th spent call."""
        t0, t1 = self.time_at(first), self.time_at(last)
        if t0 is None or t1 is None or t1 <= t0:
            return float("nan")
        return (last - first) / (t1 - t0)


def drive_run(stack: Stack, env: Mapping[str, str], src: str, timeout_s: float,
              scan_args: Sequence[str] = ()) -> DrivenRun:
    """Scan `src` with the `irlive` CLI, then poll the run's status (and sample the spend) until it stops."""
    client = Store.from_url(stack.redis_url)
    runs = Runs(client, KEYS)
    try:
        with Sampler(stack.redis_url, timeout_s + 60) as sampler:
            started = time.monotonic()
            scanned = run_cli(stack, env, "scan", src, "--json", *scan_args)
            run_id = str(scanned["run_id"])
            final: list[RunStatus] = []

            polls = 0

            def stopped() -> bool:
                nonlocal polls
                polls += 1
                status = runs.status(run_id)
                if status is not None and status.stopped:
                    final.append(status)
                    return True
                return False

            wait_until(stopped, timeout_s, f"run {run_id} to stop", interval=STATUS_INTERVAL_S)
            wall = time.monotonic() - started
        return DrivenRun(run_id, final[0], scanned, wall, sampler.samples, started,
                         Counter({"hget": 2 * len(sampler.samples), "hgetall": polls}))
    finally:
        client.close()


def read_records(stack: Stack, run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run manifest and every record of every chunk manifest it lists."""
    s3 = s3_client(stack, pool=4)
    base = f"results/runs/{run_id}"
    manifest = json.loads(s3.get_object(Bucket=OUT_BUCKET, Key=f"{base}/manifest.json")["Body"].read())
    records: list[dict[str, Any]] = []
    for chunk in manifest["chunks"]:
        doc = json.loads(s3.get_object(Bucket=OUT_BUCKET, Key=chunk["key"])["Body"].read())
        records.extend(doc["images"])
    return manifest, records


def record_problems(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[str]:
    """Empty when every key has exactly one record and no record is for anything else."""
    counts = Counter(str(r["key"]) for r in records)
    expected = set(keys)
    problems = []
    missing = expected - counts.keys()
    if missing:
        problems.append(f"{len(missing)} images without a record")
    twice = [k for k, n in counts.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} images with more than one record")
    extra = counts.keys() - expected
    if extra:
        problems.append(f"{len(extra)} records for unknown keys")
    return problems


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, {platform.system()}"


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (also readable on a terminal)."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
