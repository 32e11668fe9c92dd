"""One Redis, many hosts: the Redis commands an image costs do not grow with the number of worker processes
(each a "host": its own connections, heartbeats and watchdog) sharing it. docs/SCALE.md has the figures."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sandbox.procs import wait_until
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET
from tests.faults import check_invariants, live_samples, upload_samples
from worker.keys import Keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 200
# Today's figure is about 30 commands an image at these sizes (docs/SCALE.md); a change that makes an image cost
# much more, or makes the cost grow with the hosts, fails here.
MOST_PER_IMAGE = 40
ENV = {"IRLIVE_RATE_LIMIT_PER_S": "20"}


def _commands(stack: Stack) -> Counter[str]:
    stats = stack.redis_client().info("commandstats")
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def _run(stack: Stack, irlive: IrliveRunner, hosts: int, prefix: str) -> tuple[float, Counter[str]]:
    """Redis commands per image of one run judged by `hosts` worker processes, and the commands by name."""
    samples = live_samples(IMAGES, prefix, seed=hosts)
    upload_samples(stack, samples)
    # Each run from nothing: no workers, an empty Redis, a seller whose books start at zero.
    stack.stop_workers()
    stack.redis_client().flushall()
    stack.reset_sandbox()
    stack.sandbox_config(latency_ms=200)
    for _ in range(hosts):
        stack.start_worker(extra_env=ENV, concurrency=8)
    before = _commands(stack)
    run_id = json.loads(irlive("scan", f"s3://{IN_BUCKET}/{prefix}", "--json", env=ENV).stdout)["run_id"]
    client = stack.redis_client()
    # One HGET a second while waiting: a few commands in all, next to thousands.
    wait_until(lambda: client.hget(Keys().run(run_id), "state") == b"done", 180, f"run {run_id} done", interval=1.0)
    used = _commands(stack) - before
    assert check_invariants(stack, run_id, samples) == []
    return sum(used.values()) / IMAGES, used


def test_four_hosts_on_one_redis_cost_no_more_commands_per_image_than_one(clean_stack: Stack,
                                                                            irlive: IrliveRunner) -> None:
    one, _ = _run(clean_stack, irlive, 1, "one-host")
    four, by_four = _run(clean_stack, irlive, 4, "four-hosts")
    print(f"Redis commands per image: 1 host {one:.1f}, 4 hosts {four:.1f}; "
          f"4 hosts by command: {[(c, round(n / IMAGES, 2)) for c, n in by_four.most_common(10)]}")
    assert one <= MOST_PER_IMAGE and four <= MOST_PER_IMAGE, (one, four, by_four.most_common(10))
    assert four <= one * 1.25, f"4 hosts cost {four:.1f} commands an image, 1 host {one:.1f}"
