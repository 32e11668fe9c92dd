"""Shared fixtures: one real stack per session, cleaned per test, and a runner for the `irlive` CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Whatever touches the stack is an integration test, so `-m "not integration"` stays server-free.
    for item in items:
        if _STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


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
