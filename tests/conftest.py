"""Shared fixtures: one real stack per session, cleaned per test, and a runner for the `irlive` CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from sandbox.config import SandboxConfig
from sandbox.stack import Stack

SETTINGS_ENV = {
    "IRLIVE_OUTPUT": "s3://irlive-out/results",
    "IRLIVE_RATE_LIMIT_PER_S": "50",
}
BUCKETS = ("irlive-in", "irlive-out")
IRLIVE_BIN = Path(sys.executable).parent / "irlive"
_STACK_FIXTURES = {"stack", "clean_stack", "irlive"}

IrliveRunner = Callable[..., "subprocess.CompletedProcess[str]"]


# Seconds each test took in a whole `./dev.sh test` (written by `--store-durations`): the order tests are handed to
# the xdist workers, longest first, so the run does not end waiting on one long test started last.
DURATIONS = Path(__file__).with_name("durations.json")
# The slow fault tests run in this many xdist groups, each group in order on one worker: no more of them at once
# than there are cores, so the timing they provoke (kills, restarts, timeouts) is not stretched by each other.
SLOW_LANES = 2


# CI draws the property tests' examples from a fixed seed: the commit that lands is the commit that was tested.
# Every other run draws new ones, which is how new counterexamples are found (each then pinned with @example).
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help=f"write each test's duration to {DURATIONS.name} (the order of the next parallel run)")


@pytest.hookimpl(tryfirst=True)  # before xdist's worker suffixes group names to the node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever touches the stack is an integration test, so `-m "not integration"` stays server-free.
    for item in items:
        if _STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    known: dict[str, float] = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}

    def guess(item: pytest.Item) -> float:
        # A test not measured yet: as long as its kind usually is.
        return known.get(item.nodeid, 30.0 if item.get_closest_marker("slow") else
                         8.0 if item.get_closest_marker("integration") else 0.1)

    items.sort(key=guess, reverse=True)
    lanes = [0.0] * SLOW_LANES
    for item in items:  # longest first into the emptiest lane
        if item.get_closest_marker("slow"):
            lane = lanes.index(min(lanes))
            lanes[lane] += guess(item)
            item.add_marker(pytest.mark.xdist_group(f"slow-{lane}"))


class _DurationRecorder:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid.split("@")[0] if "@" in report.nodeid.rsplit("]", 1)[-1] else report.nodeid
        self.seconds[nodeid] = self.seconds.get(nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        DURATIONS.write_text(json.dumps({k: round(v, 1) for k, v in sorted(self.seconds.items())}, indent=0) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    # On the controller only (an xdist worker has workerinput): it sees every worker's reports.
    if config.getoption("--store-durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_DurationRecorder(), "irlive-durations")


@pytest.fixture(autouse=True)
def logging_left_on() -> Iterator[None]:
    """Fails the test that leaves logging switched off: every later test on its xdist worker would read no logs."""
    yield
    left = logging.root.manager.disable
    logging.disable(logging.NOTSET)
    assert not left, f"the test left logging.disable({logging.getLevelName(left)}) behind"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, moto_server and the sandbox, started once; no workers (tests start their own)."""
    with Stack(tmp_path_factory.mktemp("stack"), settings_env=SETTINGS_ENV) as s:
        yield s


@pytest.fixture
def clean_stack(stack: Stack) -> Stack:
    """The session stack with no workers, empty Redis and S3 (but the two buckets), a fresh sandbox."""
    reset_stack(stack)
    return stack


def reset_stack(stack: Stack) -> None:
    """What clean_stack does; also for one more trial inside the same test."""
    stack.stop_workers()
    # Tests read "the workers' logs" as every w*.log of the stack: those of earlier tests (whichever ran before
    # on this xdist worker) are moved aside, kept for a post-mortem.
    earlier = stack.workdir / "earlier-tests"
    earlier.mkdir(exist_ok=True)
    for log in stack.workdir.glob("w*.log"):
        log.rename(earlier / log.name)
    if "redis" not in stack.pids():
        # A previous test stopped Redis and failed before starting it again.
        stack.start_redis(appendonly=True)
    elif not stack.redis_appendonly:
        # A previous test left a Redis that keeps nothing; workers and scans refuse one (as users' do).
        stack.restart_redis(appendonly=True)
    stack.redis_client().flushall()
    stack.reset_s3()
    stack.reset_sandbox()
    stack.sandbox_config(**dataclasses.asdict(SandboxConfig()))
    s3 = stack.s3_client()
    for bucket in BUCKETS:
        s3.create_bucket(Bucket=bucket)


def run_irlive(
    stack: Stack, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run the `irlive` console script against `stack`; `env` adds to or overrides the stack's env."""
    return subprocess.run(
        [str(IRLIVE_BIN), *args],
        env={**os.environ, **stack.env, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def irlive(stack: Stack) -> IrliveRunner:
    """`irlive("scan", "s3://irlive-in/x", env={...}, timeout=60)` → CompletedProcess with text output."""

    def run(
        *args: str, env: Mapping[str, str] | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return run_irlive(stack, *args, env=env, timeout=timeout)

    return run
