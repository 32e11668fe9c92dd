"""`irlive stack` (`./dev.sh stack`): a local stack kept up for trying commands by hand; the export lines it
prints point another shell's `irlive` at it, and Ctrl-C stops every process it started (issue 22, item 12)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from sandbox.images import png
from tests.conftest import IRLIVE_BIN

pytestmark = pytest.mark.integration


def _env_of(lines: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in lines.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = shlex.split(value)[0]
    return env


def _processes_with(variable: str) -> list[int]:
    """Processes whose environment holds `variable` (NAME=value)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if variable.encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_stack_stays_up_serves_a_scan_from_another_shell_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env_file = tmp_path / "stack.env"
    proc = subprocess.Popen([str(IRLIVE_BIN), "stack", "--workers", "1", "--env-file", str(env_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not env_file.exists():
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the stack did not come up"
            time.sleep(0.2)
        env = _env_of(env_file.read_text())
        assert {"IRLIVE_REDIS_URL", "IRLIVE_S3_ENDPOINT_URL", "IRLIVE_MARKETPLACE_URL", "IRLIVE_OUTPUT",
                "AWS_ACCESS_KEY_ID"} <= env.keys()
        s3 = boto3.client("s3", endpoint_url=env["IRLIVE_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                          config=Config(s3={"addressing_style": "path"}))
        for i in range(12):
            s3.put_object(Bucket="irlive-captures", Key=f"cam1/img_{i}.png", Body=png(96, 96, "live", seed=i))
        # Another shell: only the printed variables, nothing of this test's environment.
        shell = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **env}
        done = subprocess.run([str(IRLIVE_BIN), "scan", "s3://irlive-captures/cam1", "--wait", "--json"], env=shell,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        final = json.loads(done.stdout.splitlines()[-1])
        assert final["state"] == "done" and final["judged"]["live"] == 12
        workers = _processes_with(f"IRLIVE_REDIS_URL={env['IRLIVE_REDIS_URL']}")
        assert workers, "the stack's worker runs with the printed Redis URL"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "export IRLIVE_REDIS_URL=" in out and "Ctrl-C stops everything" in out
    ports = [int(env[name].rsplit(":", 1)[1].split("/")[0])
             for name in ("IRLIVE_REDIS_URL", "IRLIVE_S3_ENDPOINT_URL", "IRLIVE_MARKETPLACE_URL")]
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) or any(_listening(port) for port in ports):
        assert time.monotonic() < deadline, "Redis, S3, the sandbox or a worker still runs after Ctrl-C"
        time.sleep(0.2)
