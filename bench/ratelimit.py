"""Issue 4 benchmark: irlive's global limiter against Celery's per-process rate_limit on a rate-limited sandbox."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench import common
from sandbox.stack import Stack

SCENARIOS = ("a", "b", "c", "d")
# `all` is the three the issue asks for; (d) is the baseline tuned by hand, run on request.
ALL = ("a", "b", "c")
TITLES = {
    "a": "irlive global limiter at R",
    "b": "Celery rate_limit=R/s per task (baseline)",
    "c": "irlive told W/s, seller allows S/s",
    "d": "Celery rate_limit=R/workers per task",
}


@dataclass(frozen=True)
class Scenario:
    """What the workers are told and what the sandbox really allows."""

    name: str
    sandbox_rate: float
    sandbox_burst: int
    worker_env: dict[str, str]
    app: str = "worker"


@dataclass(frozen=True)
class Figures:
    """What one scenario measured."""

    scenario: Scenario
    images: int
    billed: int
    calls_total: int
    throttled: int
    span_s: float
    steady_rate: float
    wall_s: float
    state: str
    problems: list[str]
    final_rate: float | None
    min_rate: float | None
    decreases: int
    load: float

    @property
    def achieved(self) -> float:
        """Calls per second from the first billed call to the last: (N - 1) intervals over that time."""
        return (self.billed - 1) / self.span_s if self.span_s > 0 else float("nan")

    @property
    def utilisation(self) -> float:
        return self.achieved / self.scenario.sandbox_rate

    @property
    def steady_utilisation(self) -> float:
        return self.steady_rate / self.scenario.sandbox_rate

    @property
    def throttled_ratio(self) -> float:
        return self.throttled / self.calls_total if self.calls_total else float("nan")


def title(name: str, ns: argparse.Namespace) -> str:
    return TITLES[name].replace("W/s", f"{ns.unknown_worker_rate:g}/s").replace("S/s", f"{ns.unknown_seller_rate:g}/s")


def scenarios(ns: argparse.Namespace) -> list[Scenario]:
    per_call = str(ns.images_per_call)
    chunk = {"IRLIVE_CHUNK_SIZE": per_call, "IRLIVE_IMAGES_PER_CALL": per_call}
    burst = ns.sandbox_burst or max(1, round(ns.rate))
    unknown_burst = ns.sandbox_burst or max(1, round(ns.unknown_seller_rate))
    irlive = {**chunk, "IRLIVE_RATE_BURST": str(ns.worker_burst)}
    built = {
        "a": Scenario("a", ns.rate, burst, {**irlive, "IRLIVE_RATE_LIMIT_PER_S": f"{ns.rate:g}"}),
        "b": Scenario("b", ns.rate, burst, {
            **chunk, "IRLIVE_RATE_LIMIT_PER_S": f"{common.NEUTRAL_RATE:g}", "IRLIVE_RATE_ADAPTIVE": "false",
            common.RATE_ENV: f"{ns.rate:g}"}, app="bench.baseline_app"),
        "c": Scenario("c", ns.unknown_seller_rate, unknown_burst,
                      {**irlive, "IRLIVE_RATE_LIMIT_PER_S": f"{ns.unknown_worker_rate:g}"}),
        "d": Scenario("d", ns.rate, burst, {
            **chunk, "IRLIVE_RATE_LIMIT_PER_S": f"{common.NEUTRAL_RATE:g}", "IRLIVE_RATE_ADAPTIVE": "false",
            common.RATE_ENV: f"{ns.rate / ns.workers:g}"}, app="bench.baseline_app"),
    }
    wanted = ALL if ns.scenario == "all" else tuple(ns.scenario)
    return [built[name] for name in wanted]


def measure(stack: Stack, sc: Scenario, keys: list[str], ns: argparse.Namespace) -> Figures:
    common.reset(stack, rate_limit_per_s=sc.sandbox_rate, rate_burst=sc.sandbox_burst, latency_ms=ns.latency_ms)
    common.start_workers(stack, ns.workers, ns.concurrency, sc.worker_env, sc.app)
    expected_s = len(keys) / ns.images_per_call / sc.sandbox_rate
    run = common.drive_run(stack, sc.worker_env, common.source(), timeout_s=max(120.0, 4 * expected_s + 60))
    load = os.getloadavg()[0]
    stack.stop_workers()
    client = stack.redis_client()
    try:
        decreases = int(client.hget(common.KEYS.ratelimit() + ":state", "decreases") or 0)
    finally:
        client.close()
    ledger = stack.sandbox_ledger()
    billed = int(ledger["calls_billed"])
    first, last = run.time_at(1), run.time_at(billed)
    span = (last - first) if first is not None and last is not None else float("nan")
    problems = []
    if run.status.state == "done":
        _, records = common.read_records(stack, run.run_id)
        problems = common.record_problems(records, keys)
    else:
        problems.append(f"run ended {run.status.state}: {run.status.error}")
    errors = run.status.counts.get("error", 0) + run.status.counts.get("rejected", 0)
    if errors:
        problems.append(f"{errors} images ended error/rejected")
    paid_twice = sum(1 for n in ledger["billed_image_urls_path_counts"].values() if n > 1)
    if paid_twice:
        problems.append(f"{paid_twice} images billed more than once")
    rates = [s.rate for s in run.samples if s.rate is not None]
    return Figures(
        scenario=sc, images=len(keys), billed=billed, calls_total=int(ledger["calls_total"]),
        throttled=int(ledger["throttled"]), span_s=span,
        steady_rate=run.rate_between(math.ceil(0.1 * billed), math.floor(0.9 * billed)), wall_s=run.wall_s,
        state=run.status.state, problems=problems, final_rate=rates[-1] if rates else None,
        min_rate=min(rates) if rates else None, decreases=decreases, load=load)


def report(figures: Sequence[Figures], ns: argparse.Namespace) -> str:
    header = ["scenario", "seller R/s (burst)", "calls billed", "calls sent", "achieved/s", "utilisation",
              "util. 10-90 %", "throttled ÷ calls", "wall s", "load", "one record each"]
    rows = []
    for f in figures:
        rows.append([
            f"({f.scenario.name}) {title(f.scenario.name, ns)}",
            f"{f.scenario.sandbox_rate:g} ({f.scenario.sandbox_burst})",
            str(f.billed), str(f.calls_total), f"{f.achieved:.2f}", f"{f.utilisation:.3f}",
            f"{f.steady_utilisation:.3f}", f"{f.throttled_ratio:.4f}", f"{f.wall_s:.1f}", f"{f.load:.1f}",
            "yes" if not f.problems else "NO: " + "; ".join(f.problems)])
    lines = [
        f"bench.ratelimit: {figures[0].images if figures else 0} images, "
        f"{ns.images_per_call} image(s) per chunk = per call, "
        f"{ns.workers} worker processes x {ns.concurrency} threads, sandbox latency {ns.latency_ms} ms, "
        f"irlive burst {ns.worker_burst}; "
        f"{common.machine()}; {common.today()}",
        "",
        common.table(header, rows),
        "",
        "utilisation = (calls billed - 1) / (R x seconds from the first to the last billed call);",
        "util. 10-90 % = the same over the calls from the 10th to the 90th percentile (start-up and tail left out);",
        "throttled ÷ calls = sandbox ledger `throttled` / `calls_total` (every call that reached the paid endpoint);",
        "load = the machine's 1-minute load average when the run ended (other work on the host included).",
    ]
    for f in figures:
        if f.scenario.name == "c" and f.final_rate is not None and f.min_rate is not None:
            lines.append(f"(c) limiter's effective rate: lowest {f.min_rate:.2f}/s, at the end {f.final_rate:.2f}/s "
                         f"(ceiling {ns.unknown_worker_rate:g}/s, seller {f.scenario.sandbox_rate:g}/s); "
                         f"{f.decreases} multiplicative decreases")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ratelimit", description=__doc__)
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--rate", type=float, default=20.0, help="R: the seller's limit in (a) and (b), calls/s")
    p.add_argument("--sandbox-burst", type=int, default=0,
                   help="the sandbox's GCRA burst (default: R, like a per-second QPS window)")
    p.add_argument("--worker-burst", type=int, default=1, help="IRLIVE_RATE_BURST for irlive in (a) and (c)")
    p.add_argument("--unknown-worker-rate", type=float, default=50.0, help="(c): what the workers are told")
    p.add_argument("--unknown-seller-rate", type=float, default=10.0, help="(c): what the sandbox allows")
    p.add_argument("--images-per-call", type=int, default=10, choices=range(1, 11), metavar="1-10",
                   help="images per call, and per chunk, so one chunk is one call (default 10)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--latency-ms", type=int, default=0, help="added sandbox latency per judged call")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    common.keep_bytecode()
    ns = parse(argv)
    started = time.monotonic()
    figures: list[Figures] = []
    with Stack(settings_env=common.base_env()) as stack:
        keys = common.upload_images(stack, ns.images)
        print(f"uploaded {len(keys)} images in {time.monotonic() - started:.1f} s", file=sys.stderr)
        for sc in scenarios(ns):
            print(f"scenario ({sc.name}) {title(sc.name, ns)} ...", file=sys.stderr)
            figures.append(measure(stack, sc, keys, ns))
            print(report(figures[-1:], ns).splitlines()[4], file=sys.stderr)
    print(report(figures, ns))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
