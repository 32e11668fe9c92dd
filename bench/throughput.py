"""Throughput next to a plain batched script, on one stack in one invocation (issue 14).

The baseline is what a user could write in forty lines: list the prefix, and from a thread pool, for every ten
keys, buy a token, presign ten URLs, call the seller and keep the answer; one results file at the end. No
limiter, no validation, no ledger, no claims. irlive then judges the same images through the `irlive` CLI and
real `celery worker` processes, from an empty Redis each time, with no rate limit and at R calls per second.

Printed per scenario: wall time (the scan command to the run's end), its ratio to the baseline and to the ideal
N / 10 / R, worker CPU ms per image (the worker processes' user + system time during the run ÷ images), S3
requests per image counted at moto_server (its request log: irlive's own, and the seller's fetches of the
presigned URLs apart), Redis bytes per judged image once the run is finalised (MEMORY USAGE of every irlive key
left, ÷ images), and the CPU the stack's own processes (moto_server, the sandbox, Redis) spent per image: on a
small machine they share its cores with the workers, and moto_server serves from one Python process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import redis

from bench import common
from sandbox.config import SERVICE_ID
from sandbox.procs import wait_until
from sandbox.stack import Stack
from worker.seams.store import script_sha

PER_CALL = 10
# moto_server's request log (werkzeug): "METHOD /path?query HTTP/1.1" status
_REQUEST = re.compile(r'"(?:\x1b\[[\d;]*m)*(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+(?:\x1b\[[\d;]*m)*" (\d+)')
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    name: str
    images: int
    wall_s: float
    cpu_s: float | None = None
    s3_own: Counter[str] | None = None
    s3_seller: int = 0
    redis_bytes: float | None = None
    ideal_s: float | None = None
    # CPU seconds of the stack's own processes during the scenario: what the two cores were shared with.
    services_cpu: dict[str, float] | None = None
    # Redis commands served during the scenario, by command (everything: workers, the CLI, the bench's sampler).
    redis_cmds: Counter[str] | None = None
    # Paid calls, chunks the watchdog handed back while their workers lived, calls the seller refused to download.
    calls: int | None = None
    handed_back: int = 0
    download_refused: int = 0
    # Seconds from the scan command to the first paid call and to the last (the wallet's count, sampled).
    first_call_s: float | None = None
    last_call_s: float | None = None
    # With --redis-time: Redis's own microseconds per command or script (name -> (calls, µs)), from its SLOWLOG.
    redis_time: dict[str, tuple[int, int]] | None = None

    def row(self, baseline_s: float) -> list[str]:
        own = sum(self.s3_own.values()) if self.s3_own is not None else None
        return [
            self.name, f"{self.wall_s:.1f}", f"{self.wall_s / baseline_s:.2f}",
            f"{self.ideal_s:.1f}" if self.ideal_s else "-",
            f"{self.wall_s / self.ideal_s:.2f}" if self.ideal_s else "-",
            f"{self.cpu_s * 1000 / self.images:.2f}" if self.cpu_s is not None else "-",
            f"{own / self.images:.3f}" if own is not None else "-",
            f"{self.s3_seller / self.images:.3f}",
            f"{self.redis_bytes:.0f}" if self.redis_bytes is not None else "-",
            f"{sum(self.redis_cmds.values()) / self.images:.1f}" if self.redis_cmds is not None else "-",
        ]  # fmt: skip


class Requests(Protocol):
    """S3 requests served since the last mark: irlive's own by kind, and the seller's whole-object fetches."""

    def mark(self) -> None: ...

    def since_mark(self) -> tuple[Counter[str], int]: ...


class FastS3Requests:
    """What bench.fakes3 counted (GET /_stats): a ranged GET is irlive's, a whole one the seller's."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._at: Counter[str] = Counter()

    def _stats(self) -> Counter[str]:
        return Counter(httpx.get(f"{self._url}/_stats", timeout=10).json())

    def mark(self) -> None:
        self._at = self._stats()

    def since_mark(self) -> tuple[Counter[str], int]:
        now = self._stats()
        now.subtract(self._at)
        own = Counter({"GET": now["ranged_get"], "LIST": now["list"], "PUT": now["put"], "HEAD": now["head"]})
        return +own, now["get"]


@contextmanager
def fast_s3(latency_ms: float = 0.0) -> Iterator[tuple[str, int]]:
    """bench.fakes3 in its own process, with the benchmark's two buckets: (endpoint URL, pid)."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.fakes3", "--keys", "0", "--empty", common.OUT_BUCKET,
                             "--latency-ms", str(latency_ms)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}", proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


class MotoRequests:
    """Counts the requests moto_server logged since the last mark: the seller's fetches (presigned GETs) apart."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._offset = 0

    def mark(self) -> None:
        self._offset = self._log.stat().st_size

    def since_mark(self) -> tuple[Counter[str], int]:
        with self._log.open("rb") as f:
            f.seek(self._offset)
            text = f.read().decode("utf-8", "replace")
        own: Counter[str] = Counter()
        seller = 0
        for method, path, status in _REQUEST.findall(text):
            if path.startswith("/moto-api"):
                continue
            if method == "GET" and status == "200" and "X-Amz-Signature=" in path:
                # The seller fetches whole objects by presigned URL; every read of irlive's is ranged (206).
                seller += 1
            else:
                own[_kind(method, path)] += 1
        return own, seller


def _kind(method: str, path: str) -> str:
    if method == "GET" and ("list-type=" in path or path.count("/") == 1):
        return "LIST"
    return method


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the given processes (their own, not their children's), in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICKS


# The S3 server's pid when it is not the stack's moto_server (bench.fakes3).
S3_PID: dict[str, int] = {}


def services(stack: Stack) -> dict[str, int]:
    pids = {name: pid for name, pid in stack.pids().items() if name in ("sandbox", "redis")}
    pids["s3"] = S3_PID.get("s3") or stack.pids()["moto"]
    return pids


def services_cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds([pid]) for name, pid in pids.items()}


def plain_batched(stack: Stack, prefix: str, threads: int, endpoint: str | None) -> Result:
    """The baseline: list, then per ten keys buy a token, presign, call; one results file at the end."""
    s3 = common.s3_client(stack, pool=threads, endpoint=endpoint)
    http = httpx.Client(base_url=stack.sandbox_url, timeout=60,
                        limits=httpx.Limits(max_connections=threads, max_keepalive_connections=threads))
    started, cpu0, svc0 = time.monotonic(), time.process_time(), services_cpu(services(stack))
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=common.IN_BUCKET, Prefix=prefix)
            for o in page.get("Contents", ())]

    def judge(batch: list[str]) -> object:
        token = http.post("/api/payments", json={"serviceId": SERVICE_ID}).json()["token"]
        urls = [s3.generate_presigned_url("get_object", Params={"Bucket": common.IN_BUCKET, "Key": k},
                                          ExpiresIn=900) for k in batch]
        answer = http.post(f"/api/tools/{SERVICE_ID}", json={"Tasks": [{"ImageURL": u} for u in urls]},
                           headers={"X-Payment-Token": token})
        if answer.is_error:
            raise RuntimeError(f"the baseline's call answered {answer.status_code}: {answer.text[:300]}")
        return answer.json()["data"]["Result"]

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(judge, [keys[i:i + PER_CALL] for i in range(0, len(keys), PER_CALL)]))
    s3.put_object(Bucket=common.OUT_BUCKET, Key="plain/results.json", Body=json.dumps(results).encode())
    wall, cpu = time.monotonic() - started, time.process_time() - cpu0
    svc = {name: t - svc0[name] for name, t in services_cpu(services(stack)).items()}
    http.close()
    return Result("plain batched script (baseline)", len(keys), wall, cpu, services_cpu=svc)


def script_names() -> dict[str, str]:
    """irlive's Lua scripts by the SHA-1 EVALSHA names them with."""
    names = {}
    for package in ("flow", "money"):
        folder = Path(__file__).resolve().parent.parent / "worker" / package / "scripts"
        for path in folder.glob("*.lua"):
            names[script_sha(package, path.stem)] = path.stem
    return names


@contextmanager
def redis_timed(client: redis.Redis, on: bool) -> Iterator[dict[str, tuple[int, int]]]:
    """With `on`, every command Redis runs meanwhile goes to its SLOWLOG (a threshold of 0: it costs Redis a
    little), read at the end per command and per script; a script's time includes the commands it runs."""
    found: dict[str, tuple[int, int]] = {}
    if not on:
        yield found
        return
    before = client.config_get("slowlog-*")
    client.config_set("slowlog-max-len", 2_000_000)
    client.config_set("slowlog-log-slower-than", 0)
    client.slowlog_reset()
    try:
        yield found
        names = script_names()
        entries = client.slowlog_get(2_000_000)
    finally:
        for name, value in before.items():
            client.config_set(name, value)
    for entry in entries:
        words = entry["command"].decode("utf-8", "replace").split(" ") if isinstance(entry["command"], bytes) \
            else str(entry["command"]).split(" ")
        name = words[0].upper()
        if name == "EVALSHA" and len(words) > 1:
            name = f"{names.get(words[1], words[1][:12])}.lua"
        calls, us = found.get(name, (0, 0))
        found[name] = (calls + 1, us + int(entry["duration"]))


def redis_commands(client: redis.Redis) -> Counter[str]:
    """Calls per command since the server's last CONFIG RESETSTAT (INFO commandstats)."""
    stats = client.info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def irlive_run(stack: Stack, name: str, ns: argparse.Namespace, rate: float | None, moto: Requests) -> Result:
    env = {"IRLIVE_RATE_LIMIT_PER_S": str(rate or common.NEUTRAL_RATE)}
    if rate is None:
        env["IRLIVE_RATE_ADAPTIVE"] = "false"
    common.reset(stack, latency_ms=ns.latency_ms)
    client = redis.Redis.from_url(stack.redis_url)
    common.start_workers(stack, ns.workers, ns.concurrency, env)
    pids = [w.pid for w in stack.workers]
    logs = {w.log: w.log.stat().st_size for w in stack.workers}
    cpu0, svc0 = cpu_seconds(pids), services_cpu(services(stack))
    moto.mark()
    client.config_resetstat()
    with redis_timed(client, ns.redis_time) as timed:
        run = common.drive_run(stack, env, common.source(), timeout_s=900)
    cmds = redis_commands(client)
    cmds.subtract(run.own_commands)
    cmds = +cmds
    calls = int(client.hget("irlive:wallet:totals", "spent") or 0)
    cpu = cpu_seconds(pids) - cpu0
    svc = {name: t - svc0[name] for name, t in services_cpu(services(stack)).items()}
    own, seller = moto.since_mark()
    wait_until(lambda: bool(client.hget(f"irlive:run:{run.run_id}", "archived_at")), 60, "the run archived")
    stack.stop_workers()
    left = sum(int(client.memory_usage(k) or 0) for k in client.scan_iter("irlive:*", count=1000))
    client.close()
    judged = sum(run.status.counts[v] for v in ("live", "spoof", "no_face"))
    if judged != ns.images:
        raise RuntimeError(f"{name}: {judged} of {ns.images} images judged ({run.status.counts})")
    ideal = ns.images / PER_CALL / rate if rate else None
    text = "".join(_tail(path, offset) for path, offset in logs.items())
    first, last = run.time_at(1), run.time_at(calls)
    return Result(name, ns.images, run.wall_s, cpu, own, seller, left / judged, ideal, svc, cmds, calls,
                  text.count("handed back to the queue"), text.count("the seller could not download the images"),
                  first - run.started if first is not None else None,
                  last - run.started if last is not None else None, timed or None)


def _tail(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", "replace")


def main(argv: Sequence[str] | None = None) -> int:
    common.keep_bytecode()
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="distinct 64x64 PNG captures to judge")
    p.add_argument("--workers", type=int, default=2, help="celery worker processes")
    p.add_argument("--concurrency", type=int, default=32,
                   help="threads per worker, as the README's worker command (the baseline uses all of them)")
    p.add_argument("--baseline-threads", type=int, default=0,
                   help="the baseline's threads, i.e. its calls in flight (default: workers x concurrency)")
    p.add_argument("--rates", default="none,5,10,20", help="irlive scenarios: 'none' (no limit) or calls/s")
    p.add_argument("--latency-ms", type=int, default=0,
                   help="the sandbox seller's time per call (0: answers at once, so the stack's CPU is the bound)")
    p.add_argument("--s3", choices=("moto", "fast"), default="moto",
                   help="moto_server (the stack's), or bench.fakes3 (in memory, keep-alive, not the bound)")
    p.add_argument("--s3-latency-ms", type=float, default=0.0,
                   help="with --s3 fast: S3's time before each answer (real S3: 10-30 ms for a small GET)")
    p.add_argument("--redis-time", action="store_true",
                   help="print Redis's own time per script and command (its SLOWLOG at a threshold of 0 during "
                        "each irlive run: a little slower)")
    ns = p.parse_args(argv)
    if ns.s3_latency_ms and ns.s3 != "fast":
        p.error("--s3-latency-ms needs --s3 fast")
    if ns.s3 == "fast":
        with fast_s3(ns.s3_latency_ms) as (endpoint, pid):
            S3_PID["s3"] = pid
            return measure(ns, endpoint, FastS3Requests(endpoint))
    return measure(ns, None, None)


def measure(ns: argparse.Namespace, endpoint: str | None, counter: Requests | None) -> int:
    env = common.base_env(**({"IRLIVE_S3_ENDPOINT_URL": endpoint} if endpoint else {}))
    with Stack(settings_env=env) as stack:
        common.upload_images(stack, ns.images, endpoint=endpoint)
        moto = counter or MotoRequests(stack.log_path("moto"))
        common.reset(stack, latency_ms=ns.latency_ms)
        moto.mark()
        baseline = plain_batched(stack, "bench/", ns.baseline_threads or ns.workers * ns.concurrency, endpoint)
        baseline.s3_own, baseline.s3_seller = moto.since_mark()
        results = [baseline]
        for spec in ns.rates.split(","):
            rate = None if spec == "none" else float(spec)
            name = "irlive, no rate limit" if rate is None else f"irlive, R = {rate:g}/s"
            results.append(irlive_run(stack, name, ns, rate, moto))
            print(f"  {name}: {results[-1].wall_s:.1f} s", file=sys.stderr)
    threads = ns.baseline_threads or ns.workers * ns.concurrency
    print(f"{ns.images} images, {ns.workers} workers x {ns.concurrency} threads (baseline: {threads} threads), "
          f"seller latency {ns.latency_ms} ms, "
          f"S3: {'bench.fakes3' if endpoint else 'moto_server'}"
          f"{f' answering after {ns.s3_latency_ms:g} ms' if ns.s3_latency_ms else ''} "
          f"({common.machine()}, {common.today()})")
    print(common.table(["scenario", "wall s", "÷ baseline", "ideal s", "÷ ideal", "CPU ms/image",
                        "S3 req/image (own)", "S3 req/image (seller)", "Redis B/image after",
                        "Redis cmds/image"],
                       [r.row(baseline.wall_s) for r in results]))
    print()
    print(common.table(["scenario", "S3 server CPU ms/image", "sandbox CPU ms/image", "redis CPU ms/image"], [
        [r.name, *(f"{(r.services_cpu or {}).get(n, float('nan')) * 1000 / r.images:.2f}"
                   for n in ("s3", "sandbox", "redis"))] for r in results]))
    print()
    print("S3 requests by kind (own): " + "; ".join(
        f"{r.name}: {dict(sorted((r.s3_own or Counter()).items()))}" for r in results))
    for r in results:
        if r.calls is not None:
            print(f"{r.name}: {r.calls} paid calls ({r.calls - -(-r.images // PER_CALL)} beyond one per ten images), "
                  f"{r.download_refused} refused for downloads, {r.handed_back} chunks handed back by the watchdog")
            if r.first_call_s is not None and r.last_call_s is not None:
                print(f"  {r.name}: first paid call {r.first_call_s:.1f} s after the scan began, "
                      f"last {r.last_call_s:.1f} s, run stopped at {r.wall_s:.1f} s (±{common.SAMPLE_INTERVAL_S:g} s)")
    for r in results:
        if r.redis_cmds:
            top = ", ".join(f"{c} {n / r.images:.2f}" for c, n in r.redis_cmds.most_common(12))
            print(f"Redis commands per image, {r.name}: {top}")
    for r in results:
        if r.redis_time:
            scripts = sum(us for name, (_, us) in r.redis_time.items() if name.endswith(".lua"))
            print()
            print(f"Redis's own time, {r.name}: {scripts / r.images:.0f} µs per image in irlive's scripts (a "
                  "script's time includes the commands it runs, which are listed again on their own)")
            rows = sorted(r.redis_time.items(), key=lambda kv: -kv[1][1])[:15]
            print(common.table(["script or command", "calls", "µs per call", "µs per image"],
                               [[name, str(calls), f"{us / calls:.1f}", f"{us / r.images:.1f}"]
                                for name, (calls, us) in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
