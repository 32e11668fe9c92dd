"""A numeric setting no number can hold (`inf`, `1e400`) stops the CLI with exit 2 naming the variable: no
OverflowError traceback (issue 22, item 5). No server needed: the settings are read before anything connects."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import IRLIVE_BIN


@pytest.mark.parametrize(("var", "value"), [("IRLIVE_EVENT_RUN_WINDOW", "inf"), ("IRLIVE_SINCE_OVERLAP_S", "1e400"),
                                            ("IRLIVE_CALL_TIMEOUT_S", "nan"), ("IRLIVE_CHUNK_SIZE", "1e400")])
def test_a_setting_no_number_can_hold_exits_2_naming_it(var: str, value: str) -> None:
    env = {**os.environ, var: value, "IRLIVE_REDIS_URL": "redis://127.0.0.1:1/0"}
    for args, code in ((["status", "some-run"], 2), (["scan", "s3://in/prefix", "--dry-run"], 2), (["config"], 1)):
        done = subprocess.run([str(IRLIVE_BIN), *args], env=env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert var in done.stdout + done.stderr, (args, done.stdout, done.stderr)
