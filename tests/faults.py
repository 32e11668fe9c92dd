"""Fault-injection harness: drive a run home despite faults, then check what must hold after every trial.

`check_invariants` is the oracle of issue 5: one record per image, manifests that add up, no token used
twice, no image billed twice with an answer received, and the worker's ledger equal to the sandbox's, down
to each image. `drive_to_completion` polls a run, calls `irlive reconcile` when it stalls, and gives up at
a deadline with the state and the worker logs in the message.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import redis

from sandbox.images import Sample, png
from sandbox.procs import log_tail
from sandbox.stack import Stack
from tests.conftest import run_irlive
from tests.e2e import IN_BUCKET, OUT_BUCKET, OUT_PREFIX, upload
from worker.judge.manifest import join_identities, split_identities

OPEN_STATES = ("reserved", "sent")
JUDGED = ("live", "spoof", "no_face")
VERDICTS = (*JUDGED, "rejected", "error")


def seed_from_env(name: str = "IRLIVE_FAULT_SEED") -> int:
    """The trial seed: $IRLIVE_FAULT_SEED to replay a failure, else a fresh one (printed by the caller)."""
    raw = os.environ.get(name)
    return int(raw) if raw else random.SystemRandom().randrange(1, 2**31)


def long_mode() -> bool:
    return os.environ.get("IRLIVE_LONG_FAULTS", "") not in ("", "0", "false", "no")


# ---- trial set-up --------------------------------------------------------------------------------------


def live_samples(n: int, prefix: str, seed: int = 0) -> list[Sample]:
    """n judgeable captures (live, spoof and no-face mixed) under IN_BUCKET/prefix."""
    truths = ("live", "spoof", "no_face")
    out = []
    for i in range(n):
        truth = truths[(i + seed) % 3]
        out.append(Sample(f"{prefix}/img_{i:05d}.png", png(96, 96, truth, seed=seed * 100_000 + i), truth))
    return out


def upload_samples(stack: Stack, samples: Iterable[Sample]) -> None:
    upload(stack, samples)


def scan(stack: Stack, prefix: str, env: Mapping[str, str] | None = None) -> str:
    """`irlive scan s3://IN_BUCKET/prefix --json`; returns the run id."""
    done = run_irlive(stack, "scan", f"s3://{IN_BUCKET}/{prefix}", "--json", env=env, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"scan failed ({done.returncode}): {done.stderr}")
    run_id: str = json.loads(done.stdout)["run_id"]
    return run_id


# ---- driving a run home --------------------------------------------------------------------------------


@dataclass
class Drive:
    """How a run got home."""

    run_id: str
    state: str = ""
    elapsed_s: float = 0.0
    stalls: int = 0
    reconciles: list[dict[str, Any]] = field(default_factory=list)
    reconcile_missing: bool = False
    redis_errors: int = 0
    # (elapsed s, images recorded) at every change, to see where a run stood still.
    progress: list[tuple[float, int]] = field(default_factory=list)

    @property
    def requeued(self) -> int:
        return sum(len(r.get("requeued_chunks") or ()) for r in self.reconciles)


def run_snapshot(client: redis.Redis, run_id: str) -> dict[str, str]:
    raw = client.hgetall(f"irlive:run:{run_id}")
    snap = {_s(k): _s(v) for k, v in raw.items()}
    snap["_chunks_done"] = str(client.scard(f"irlive:run:{run_id}:chunks-done"))
    return snap


def reconcile(stack: Stack, run_id: str, env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """`irlive reconcile RUN --json`; None if the command does not exist (yet) or could not run."""
    done = run_irlive(stack, "reconcile", run_id, "--json", env=env, timeout=60)
    if done.returncode != 0:
        if "invalid choice" in done.stderr:
            return None
        return {"error": done.stderr.strip()[-500:], "returncode": done.returncode}
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def drive_to_completion(
    stack: Stack,
    run_id: str,
    *,
    deadline_s: float,
    stall_s: float = 20.0,
    poll_s: float = 0.25,
    during: Callable[[float, dict[str, str]], None] | None = None,
    env: Mapping[str, str] | None = None,
    reconcile_on_stall: bool = False,
) -> Drive:
    """Poll until the run is `done`; fail at the deadline. Stalls (no progress for `stall_s`) are counted; with
    reconcile_on_stall a stall also runs `irlive reconcile` (off by default: the workers must recover alone).

    `during(elapsed_s, snapshot)` runs on every poll (kills, Redis restarts, proxy switches...); the snapshot
    is empty while Redis cannot be reached.
    """
    drive = Drive(run_id)
    start = time.monotonic()
    last_change = start
    last_key: tuple[str, ...] = ()
    snap: dict[str, str] = {}
    while True:
        now = time.monotonic()
        drive.elapsed_s = now - start
        client = redis.Redis.from_url(stack.redis_url, socket_timeout=2, socket_connect_timeout=1)
        try:
            snap = run_snapshot(client, run_id)
        except (redis.RedisError, RuntimeError):
            drive.redis_errors += 1
            snap = {}
        finally:
            client.close()
        if snap:
            drive.state = snap.get("state", "")
            if drive.state == "done":
                return drive
            if drive.state in ("failed", "paused_budget"):
                raise AssertionError(f"run {run_id} ended {drive.state}: {snap.get('stop_reason') or snap}"
                                     + worker_logs(stack))
            key = tuple(snap.get(k, "") for k in ("state", "done", "pending", "_chunks_done"))
            if key != last_key:
                last_key, last_change = key, now
                drive.progress.append((round(drive.elapsed_s, 1), int(snap.get("done") or 0)))
        if during is not None:
            during(drive.elapsed_s, snap)
        if now - start > deadline_s:
            raise AssertionError(
                f"run {run_id} not done after {deadline_s:.0f} s (stalls {drive.stalls}, reconciles "
                f"{drive.reconciles}); last state {snap}" + worker_logs(stack))
        if time.monotonic() - last_change > stall_s and snap:
            drive.stalls += 1
            last_change = time.monotonic()
            if reconcile_on_stall and not drive.reconcile_missing:
                answer = reconcile(stack, run_id, env)
                if answer is None:
                    drive.reconcile_missing = True
                else:
                    drive.reconciles.append(answer)
        time.sleep(poll_s)


def worker_logs(stack: Stack, lines: int = 25) -> str:
    paths = sorted(stack.workdir.glob("w*.log"), key=lambda p: p.stat().st_mtime)[-3:]
    return "".join("\n" + log_tail(p, lines) for p in paths)


# ---- the oracle ----------------------------------------------------------------------------------------


@dataclass
class Books:
    """What the invariant check read, for the test's own figures and messages."""

    records: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    wallet: dict[str, int] = field(default_factory=dict)
    ledger: dict[str, Any] = field(default_factory=dict)
    payments: dict[str, dict[str, str]] = field(default_factory=dict)
    purchases: dict[str, dict[str, str]] = field(default_factory=dict)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    billed_twice: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def verdicts(self) -> Counter[str]:
        return Counter(r["verdict"] for r in self.records)


def check_invariants(
    stack: Stack,
    run_ids: str | list[str],
    samples: Iterable[Sample],
    *,
    strict_once: bool = False,
    env: Mapping[str, str] | None = None,
    books: Books | None = None,
) -> list[str]:
    """Every violation of the runs' guarantees (empty = all hold). Stops the workers first.

    For one run, or several over the same images (overlapping scans), per sandbox reset. Each run must hold
    exactly one record per image; the seller may bill an image more than once only for calls the ledger
    counts as lost answers or paid failures. `strict_once` also demands that every judged image was billed
    exactly once and every other image never: true only when no fault can lose an answer after billing.
    """
    runs = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    books = books if books is not None else Books()
    problems: list[str] = []
    stack.stop_workers()
    # Only now is `--all` safe: no live worker holds a token, so every open one is settled with the seller.
    rec = run_irlive(stack, "wallet", "--reconcile", "--all", "--json", env=env, timeout=120)
    if rec.returncode != 0:
        return [f"`irlive wallet --reconcile --all` failed ({rec.returncode}): {rec.stderr.strip()[-400:]}"]
    books.wallet = {k: int(v) for k, v in json.loads(rec.stdout)["totals"].items() if v is not None}
    sample_list = list(samples)
    manifests = []
    for run_id in runs:
        problems += [f"run {run_id}: {p}" if len(runs) > 1 else p
                     for p in _check_outputs(stack, run_id, sample_list, books)]
        manifests.append(books.manifest)
    books.manifests = manifests
    recorded = {r["key"] for r in books.records}
    never = sorted(s.key for s in sample_list if s.key not in recorded)
    if never:
        problems.append(f"{len(never)} images without a record in any run, e.g. {never[:3]}")
    books.ledger = stack.sandbox_ledger()
    books.payments, books.purchases = _payments(stack, books.manifests)
    x402 = (env or {}).get("IRLIVE_PAYMENT_METHOD") == "x402"
    problems += _check_x402(books) if x402 else []
    problems += _check_money(stack, runs, books, strict_once, x402=x402)
    return problems


def _check_outputs(stack: Stack, run_id: str, samples: list[Sample], books: Books) -> list[str]:
    problems: list[str] = []
    s3 = stack.s3_client()
    base = f"{OUT_PREFIX}/runs/{run_id}"
    try:
        manifest = json.loads(s3.get_object(Bucket=OUT_BUCKET, Key=f"{base}/manifest.json")["Body"].read())
    except Exception as exc:
        return [f"no run manifest for {run_id}: {type(exc).__name__}: {exc}"]
    books.manifest = manifest
    run_records: list[dict[str, Any]] = []
    seqs = [c["seq"] for c in manifest["chunks"]]
    if sorted(seqs) != list(range(len(seqs))):
        problems.append(f"manifest chunk list is not 0..n-1: {sorted(seqs)}")
    summed: Counter[str] = Counter()
    for entry in manifest["chunks"]:
        doc = json.loads(s3.get_object(Bucket=OUT_BUCKET, Key=entry["key"])["Body"].read())
        books.records.extend(doc["images"])
        run_records.extend(doc["images"])
        own = Counter(r["verdict"] for r in doc["images"])
        if {v: own.get(v, 0) for v in VERDICTS} != {v: doc["counts"].get(v, 0) for v in VERDICTS}:
            problems.append(f"chunk {entry['seq']}: counts {doc['counts']} but records say {dict(own)}")
        if entry.get("counts") != doc["counts"]:
            problems.append(f"chunk {entry['seq']}: manifest lists counts {entry.get('counts')}, chunk has "
                            f"{doc['counts']} (manifest stale against a rewritten chunk)")
        summed.update(doc["counts"])
    if {v: manifest["counts"].get(v, 0) for v in VERDICTS} != {v: summed.get(v, 0) for v in VERDICTS}:
        problems.append(f"run manifest counts {manifest['counts']} != sum of chunk counts {dict(summed)}")
    per_key = Counter(r["key"] for r in run_records)
    wanted = Counter(s.key for s in samples)
    missing = sorted(set(wanted) - set(per_key))
    extra = sorted(set(per_key) - set(wanted))
    doubled = sorted(k for k, n in per_key.items() if n > 1)
    skipped = int(manifest.get("skipped") or 0)
    if missing and len(missing) != skipped:
        # Images already judged (by another run) when this run was scanned stay out of it, counted as skipped.
        problems.append(f"{len(missing)} images without a record (and {skipped} skipped as already judged), "
                        f"e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} records of images never listed, e.g. {extra[:3]}")
    if doubled:
        problems.append(f"{len(doubled)} images with several records, e.g. {doubled[:3]}")
    if manifest.get("images") != len(run_records):
        problems.append(f"manifest says {manifest.get('images')} images, chunks hold {len(run_records)}")
    expected = {s.key: s.expected for s in samples}
    wrong = [(r["key"], r["verdict"]) for r in run_records
             if r["verdict"] in JUDGED and expected.get(r["key"], r["verdict"]) != r["verdict"]]
    if wrong:
        problems.append(f"{len(wrong)} judged images with the wrong verdict, e.g. {wrong[:3]}")
    return problems


def _check_x402(books: Books) -> list[str]:
    """x402 runs: no purchase at all, and irlive's spent signatures are exactly the sandbox's settlements (the
    answered ones by transaction; one settled whose answer was lost carries none)."""
    problems: list[str] = []
    ledger, wallet, payments = books.ledger, books.wallet, books.payments
    if ledger["payments_created"]:
        problems.append(f"{ledger['payments_created']} POST /api/payments in an x402 run")
    settled = Counter(s["transaction"] for s in ledger["x402_settlements"])
    spent = [p for p in payments.values() if p.get("state") == "spent"]
    if len(spent) != sum(settled.values()) or wallet.get("spent", 0) != len(spent):
        problems.append(f"x402: irlive spent {len(spent)} (wallet {wallet.get('spent', 0)}), the sandbox settled "
                        f"{sum(settled.values())}")
    ours = Counter(p["x402_transaction"] for p in spent if p.get("x402_transaction"))
    if ours - settled:
        problems.append(f"x402: transactions on irlive's ledger the sandbox never settled: {list(ours - settled)[:3]}")
    if ledger["x402_settled"] != ledger["calls_billed"]:
        problems.append(f"x402: the sandbox settled {ledger['x402_settled']} but billed {ledger['calls_billed']}")
    if wallet.get("bought", 0) != len(spent):
        problems.append(f"x402: {wallet.get('bought', 0)} signatures still committed, {len(spent)} spent")
    return problems


def _check_money(stack: Stack, runs: list[str], books: Books, strict_once: bool, *, x402: bool = False
                 ) -> list[str]:
    problems: list[str] = []
    ledger, wallet, payments = books.ledger, books.wallet, books.payments
    if ledger["token_uses"] > 1:
        problems.append(f"a token was used {ledger['token_uses']} times at the seller")
    states = Counter(p.get("state", "?") for p in payments.values())
    open_ = {s: states[s] for s in OPEN_STATES if states[s]}
    if open_ or wallet.get("in_flight"):
        problems.append(f"tokens still open after reconciliation: {open_}, in_flight {wallet.get('in_flight')}")
    requested = sum(1 for p in books.purchases.values() if p.get("state") == "requested")
    if requested:
        # The worker died between writing 'requested' and the seller's answer: the purchase may exist, and
        # nothing turns it into 'unknown', so `bought + unknown_purchases` can miss it.
        problems.append(f"{requested} purchases left in state 'requested' (never resolved to paid/unknown/failed)")
    bought, unknown = wallet.get("bought", 0), wallet.get("unknown_purchases", 0)
    created = ledger["payments_created"]
    if x402:
        pass  # no purchase: _check_x402 compares the signatures with the settlements
    elif not bought <= created <= bought + unknown + requested:
        problems.append(f"purchases: worker bought {bought} (+{unknown} unknown, +{requested} requested), "
                        f"seller created {created}")
    consumed = ledger["tokens_consumed"] - ledger["tokens_restored"] + ledger["x402_settled"]
    if wallet.get("spent", 0) != consumed:
        problems.append(f"spent: worker {wallet.get('spent', 0)}, seller consumed {ledger['tokens_consumed']} "
                        f"- restored {ledger['tokens_restored']} = {consumed}")
    if consumed != ledger["calls_billed"]:
        problems.append(f"seller: {consumed} tokens consumed but {ledger['calls_billed']} calls billed")
    client = stack.redis_client()
    run_calls = sum(int(_s(client.hget(f"irlive:run:{r}", "calls") or b"0")) for r in runs)
    if run_calls != ledger["calls_billed"]:
        problems.append(f"runs {runs} charged {run_calls} calls in Redis, seller billed {ledger['calls_billed']}")
    manifest_calls = sum(int(m.get("calls") or 0) for m in books.manifests if m)
    if len(books.manifests) == len(runs) and manifest_calls != ledger["calls_billed"]:
        problems.append(f"run manifests say {manifest_calls} calls, seller billed "
                        f"{ledger['calls_billed']} (Redis after reconciliation: {run_calls})")
    lost_tokens = sum(1 for p in payments.values() if p.get("state") == "spent" and p.get("lost") == "1")
    lost_runs = sum(int(_s(client.hget(f"irlive:run:{r}", "answers_lost") or b"0")) for r in runs)
    if lost_tokens != lost_runs:
        problems.append(f"{lost_tokens} tokens spent with their answer lost, runs count {lost_runs} answers_lost")
    lost_manifests = sum(int(m.get("answers_lost") or 0) for m in books.manifests if m)
    if len(books.manifests) == len(runs) and lost_manifests > lost_runs:
        problems.append(f"manifests report {lost_manifests} answers lost, the ledger {lost_runs}")
    in_pool = {_s(p) for p in stack.redis_client().lrange("irlive:wallet:pool", 0, -1)}
    stranded = [pid for pid, p in payments.items() if p.get("state") == "paid" and pid not in in_pool]
    if stranded:
        books.notes.append(f"{len(stranded)} paid tokens neither in the pool nor spent (stranded)")
    problems += _check_per_image(books, strict_once)
    return problems


def _check_per_image(books: Books, strict_once: bool) -> list[str]:
    """The seller's bill per image against the worker's ledger per image.

    Every seller-side billing of an image must be a worker-ledger payment in state `spent` whose last call
    carried that image; and at most one of those may have been *answered* (settled with a request id).
    A payment settled spent without an answer (a timeout after the seller consumed the token, a connection
    dropped mid-answer, a worker killed mid-call, a 5xx that still consumed the token) is a real charge
    whose verdict never arrived: paying again for that image is the only way to judge it, and is not a
    double payment for one verdict.
    """
    problems: list[str] = []
    billed: Counter[str] = Counter(books.ledger["billed_image_urls_path_counts"])
    spent_all: Counter[str] = Counter()
    spent_answered: Counter[str] = Counter()
    for p in books.payments.values():
        if p.get("state") != "spent":
            continue
        paths = [_path_of(identity) for identity in split_identities(p.get("images", ""))]
        spent_all.update(paths)
        if p.get("request_id"):
            spent_answered.update(paths)
    if billed != spent_all:
        diff = {k: (billed.get(k, 0), spent_all.get(k, 0)) for k in set(billed) | set(spent_all)
                if billed.get(k, 0) != spent_all.get(k, 0)}
        problems.append(f"{len(diff)} images billed by the seller a different number of times than the worker "
                        f"ledger shows spent (seller, worker), e.g. {sorted(diff.items())[:3]}")
    twice = sorted(k for k, n in spent_answered.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} images billed twice with an answer received, e.g. {twice[:3]}")
    # Every bill beyond the first must be a call the ledger counts as lost or as a paid failure.
    explained: Counter[str] = Counter()
    for p in books.payments.values():
        if p.get("state") == "spent" and not p.get("request_id"):
            explained.update(_path_of(i) for i in split_identities(p.get("images", "")))
    unexplained = sorted(k for k, n in billed.items() if n - 1 > explained.get(k, 0))
    if unexplained:
        problems.append(f"{len(unexplained)} images paid for again with no lost answer or paid failure to "
                        f"explain it, e.g. {unexplained[:3]}")
    books.billed_twice = sum(1 for n in billed.values() if n > 1)
    if strict_once:
        judged = {f"/{r['bucket']}/{quote(r['key'], safe='/~')}" for r in books.records if r["verdict"] in JUDGED}
        wrong = {k: billed.get(k, 0) for k in judged if billed.get(k, 0) != 1}
        wrong.update({k: n for k, n in billed.items() if k not in judged and n})
        if wrong:
            problems.append(f"{len(wrong)} images not billed exactly once (judged) / never (not judged), "
                            f"e.g. {sorted(wrong.items())[:3]}")
    return problems


def _payments(stack: Stack, manifests: list[dict[str, Any]]
              ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """(tokens by payment id, purchase requests by request id): what Redis still holds under irlive:pay:, and
    the payments each finished run archived to its payments.jsonl."""
    tokens: dict[str, dict[str, str]] = {}
    requests: dict[str, dict[str, str]] = {}
    s3 = stack.s3_client()
    for manifest in manifests:
        key = (manifest.get("payments") or {}).get("key")
        if not key:
            continue
        body = s3.get_object(Bucket=OUT_BUCKET, Key=key)["Body"].read().decode()
        for line in body.splitlines():
            if line.strip():
                doc = json.loads(line)
                tokens[str(doc["payment_id"])] = _ledger_form(doc)
    client = stack.redis_client()
    for key in client.scan_iter("irlive:pay:*", count=1000):
        pid = _s(key).removeprefix("irlive:pay:")
        record = {_s(k): _s(v) for k, v in client.hgetall(key).items()}
        (requests if pid.startswith("req-") else tokens)[pid] = record
    return tokens, requests


def _ledger_form(doc: dict[str, Any]) -> dict[str, str]:
    """A payments.jsonl line as the ledger's record held it in Redis (strings; images comma-joined)."""
    form = {k: "" if v is None else "1" if v is True else "0" if v is False else str(v) for k, v in doc.items()}
    if isinstance(doc.get("images"), list):
        form["images"] = join_identities(doc["images"])
    if isinstance(doc.get("urls"), list):
        form["urls"] = "\n".join(doc["urls"])
    return form


def _path_of(identity: str) -> str:
    """`bucket/key@etag` -> the URL path the seller counts (`/bucket/key`, percent-encoded like a presign)."""
    bucket_key = identity.rsplit("@", 1)[0]
    return "/" + quote(bucket_key, safe="/~")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- how fast a killed worker's chunks resume ------------------------------------------------------------


@dataclass
class ResumeWatch:
    """Times, for every chunk a killed worker held, how long until another delivery holds it or it completes.

    A chunk lease's value is `host/pid/token`; a threads-pool worker runs its tasks in its main process, the
    pid the stack knows it by. Read before the kill, polled after it.
    """

    stack: Stack
    waiting: list[tuple[float, str, int, str]] = field(default_factory=list)  # (killed at, run, seq, pid)
    resumed_s: list[float] = field(default_factory=list)

    def before_kill(self, pid: int) -> None:
        client = self.stack.redis_client()
        mark = f"/{pid}/"
        now = time.monotonic()
        for key in client.scan_iter("irlive:lease:chunk:*", count=1000):
            holder = client.get(key)
            if holder is not None and mark in _s(holder):
                run_id, seq = _s(key).removeprefix("irlive:lease:chunk:").rsplit(":", 1)
                self.waiting.append((now, run_id, int(seq), mark))

    def poll(self) -> None:
        if not self.waiting:
            return
        client = redis.Redis.from_url(self.stack.redis_url, socket_timeout=2, socket_connect_timeout=1)
        try:
            still = []
            for killed_at, run_id, seq, mark in self.waiting:
                holder = client.get(f"irlive:lease:chunk:{run_id}:{seq}")
                # A finalised run had every chunk complete; archiving it drops its chunks-done set, which can
                # happen between two polls when the run's images were all judged by an overlapping run.
                done = client.sismember(f"irlive:run:{run_id}:chunks-done", seq) \
                    or client.hexists(f"irlive:run:{run_id}", "finalised_at")
                if done or (holder is not None and mark not in _s(holder)):
                    self.resumed_s.append(time.monotonic() - killed_at)
                else:
                    still.append((killed_at, run_id, seq, mark))
            self.waiting = still
        except redis.RedisError:
            pass
        finally:
            client.close()

    @property
    def worst_s(self) -> float:
        return max(self.resumed_s, default=0.0)

    def summary(self) -> str:
        if not self.resumed_s:
            return "no killed worker held a chunk lease"
        ordered = sorted(self.resumed_s)
        return (f"{len(ordered)} chunks held by killed workers resumed: median {ordered[len(ordered) // 2]:.1f}s, "
                f"worst {ordered[-1]:.1f}s; {len(self.waiting)} never seen resuming")


# ---- a process supervisor, as deploy/ runs workers under one ------------------------------------------


@dataclass
class Supervisor:
    """Starts a new worker for every one that exited on its own, as systemd (Restart=on-failure) and Kubernetes
    do for the deploy/ files. Seen here: two Redis restarts a second apart can crash a worker's consumer inside
    kombu (AttributeError in the Redis transport's _connparams, "Unrecoverable error") and the worker exits."""

    stack: Stack
    env: Mapping[str, str]
    concurrency: int = 4
    revived: int = 0

    def __call__(self, elapsed: float = 0.0, snap: Mapping[str, str] | None = None) -> None:
        for worker in [w for w in self.stack.workers if not w.alive()]:
            self.stack.workers.remove(worker)
            self.stack.start_worker(extra_env=self.env, concurrency=self.concurrency)
            self.revived += 1
