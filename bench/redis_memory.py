"""Redis bytes per judged image: while a run is going, and after it is finalised (issue: money core, hole 15).

The baseline, measured in the same run, is the peak while the run is going (progress, payments, claims and
the broker's messages all live in Redis then); the figure that matters is what is left per image once the
run is finalised and archived: its done-set entry, plus the run's own record shared by all its images.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence

import redis

from bench import common
from sandbox.procs import wait_until
from sandbox.stack import Stack

TARGET_BYTES = 200


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.redis_memory", description=__doc__)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    return p.parse_args(argv)


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def families(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """Bytes (MEMORY USAGE) and key count by key family: irlive:<family>:..., or the broker's keys."""
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key in client.scan_iter(count=1000):
        name = key.decode()
        parts = name.split(":")
        family = ":".join(parts[:2]) if parts[0] == "irlive" else f"(broker) {parts[0][:20]}"
        found[family][0] += int(client.memory_usage(key) or 0)
        found[family][1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(found.items())}


def main(argv: Sequence[str] | None = None) -> int:
    common.keep_bytecode()
    ns = parse(argv)
    env = {"IRLIVE_RATE_LIMIT_PER_S": "100"}
    with Stack(settings_env=common.base_env()) as stack:
        common.upload_images(stack, ns.images)
        common.reset(stack)
        client = redis.Redis.from_url(stack.redis_url)
        common.start_workers(stack, ns.workers, ns.concurrency, env)
        before = used(client)
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.1):
                peak[0] = max(peak[0], used(client))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run = common.drive_run(stack, env, common.source(), timeout_s=600)
        wait_until(lambda: bool(client.hget(f"irlive:run:{run.run_id}", "archived_at")), 60, "the run archived")
        stop.set()
        sampler.join()
        stack.stop_workers()
        time.sleep(0.5)  # let the workers' connections close before the last reading
        after = used(client)
        judged = sum(run.status.counts[v] for v in ("live", "spoof", "no_face"))
        rows = [[family, str(n), str(size), f"{size / judged:.1f}"] for family, (size, n) in families(client).items()]
    during = (peak[0] - before) / judged
    left = (after - before) / judged
    print(f"{ns.images} images, {judged} judged, run {run.run_id} in {run.wall_s:.1f}s ({common.machine()}, "
          f"{common.today()})")
    print(f"used_memory before the run {before} B, peak {peak[0]} B, after finalisation {after} B")
    print(common.table(["", "bytes per judged image"], [
        ["while the run goes (peak, baseline)", f"{during:.1f}"],
        ["after finalisation", f"{left:.1f}"],
        ["after ÷ while", f"{left / during:.3f}" if during else "n/a"],
        ["target", f"<= {TARGET_BYTES}"],
    ]))
    print()
    print(common.table(["key family after finalisation", "keys", "bytes (MEMORY USAGE)", "per judged image"], rows))
    return 0 if left <= TARGET_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
