"""The local stack for demo, tests and benchmarks: private Redis, moto_server, the sandbox and Celery workers."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
import httpx
import redis
from botocore.config import Config

from sandbox import procs
from sandbox.procs import Proc, ProcessExited, wait_until

SERVICE_START_TIMEOUT_S = 30.0
WORKER_START_TIMEOUT_S = 60.0
# moto and the sandbox keep state in memory only, so a short grace before SIGKILL loses nothing.
SERVICE_STOP_TIMEOUT_S = 3.0
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_REPO = Path(__file__).resolve().parents[1]
_SERVICES = ("redis", "moto", "sandbox")


@dataclass
class Service:
    """One server subprocess of the stack, listening on 127.0.0.1:port."""

    name: str
    port: int
    proc: Proc
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class WorkerProc:
    """One `celery worker` subprocess, leader of its own process group."""

    name: str
    proc: Proc
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


class Stack:
    """Start with `with Stack(...) as stack:`; every process is stopped on exit, error or Ctrl-C."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        workers: int = 0,
        concurrency: int = 8,
        sandbox_args: Sequence[str] = (),
        settings_env: Mapping[str, str] | None = None,
        redis_appendonly: bool = True,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="irlive-stack-")) if workdir is None else Path(workdir)
        self._initial_workers = workers
        self.concurrency = concurrency
        self._sandbox_args = list(sandbox_args)
        self._settings_env = dict(settings_env or {})
        self._redis_appendonly = redis_appendonly
        self._redis_port: int | None = None
        self._services: dict[str, Service] = {}
        self._worker_seq = 0
        self.workers: list[WorkerProc] = []

    def start(self) -> Stack:
        """Start Redis, moto and the sandbox side by side, then the initial workers; stop all on failure."""
        atexit.register(self.stop)
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            for name in _SERVICES:
                self._spawn_service(name, procs.free_port())
            for name in _SERVICES:
                self._await_service(name, retry_on_port_clash=True)
            started = [self._spawn_worker(None, None) for _ in range(self._initial_workers)]
            for w in started:
                self._await_worker(w)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop workers, then the services; idempotent, and safe on processes that already died."""
        self.stop_workers()
        services = [self._services.pop(n) for n in reversed(_SERVICES) if n in self._services]
        procs.stop_groups([s.proc for s in services], SERVICE_STOP_TIMEOUT_S)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        # Unregistered last, so a second Ctrl-C during the stop still leaves atexit to finish it.
        atexit.unregister(self.stop)

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _service(self, name: str) -> Service:
        try:
            return self._services[name]
        except KeyError:
            raise RuntimeError(f"{name} is not running (stack not started, or stopped)") from None

    @property
    def redis_url(self) -> str:
        if self._redis_port is None:
            raise RuntimeError("redis has no port yet: start the stack first")
        return f"redis://127.0.0.1:{self._redis_port}/0"

    @property
    def s3_endpoint(self) -> str:
        return self._service("moto").url

    @property
    def sandbox_url(self) -> str:
        return self._service("sandbox").url

    @property
    def env(self) -> dict[str, str]:
        """What clients and workers need to reach this stack; the constructor's settings_env wins."""
        return {
            "IRLIVE_REDIS_URL": self.redis_url,
            "IRLIVE_S3_ENDPOINT_URL": self.s3_endpoint,
            "IRLIVE_MARKETPLACE_URL": self.sandbox_url,
            **AWS_ENV,
            **self._settings_env,
        }

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def pids(self) -> dict[str, int]:
        """Process-group leader of every process the stack currently manages, by name."""
        return {**{n: s.proc.pid for n, s in self._services.items()}, **{w.name: w.pid for w in self.workers}}

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def s3_client(self) -> Any:
        return self._aws_client("s3", config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))

    def sqs_client(self) -> Any:
        """SQS on the same moto_server (S3 notifications are delivered to it)."""
        return self._aws_client("sqs")

    def _aws_client(self, service: str, **kwargs: Any) -> Any:
        return boto3.client(service, endpoint_url=self.s3_endpoint, aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                            region_name=AWS_ENV["AWS_DEFAULT_REGION"], **kwargs)

    def event_queue(self, bucket: str, name: str = "irlive-events", max_receives: int = 5) -> str:
        """A queue (with a dead-letter queue after max_receives) that hears the bucket's ObjectCreated events;
        returns its URL."""
        sqs = self.sqs_client()
        dlq = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        url: str = sqs.create_queue(QueueName=name, Attributes={
            "VisibilityTimeout": "30",
            "RedrivePolicy": f'{{"deadLetterTargetArn": "{dlq_arn}", "maxReceiveCount": "{max_receives}"}}',
        })["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.s3_client().put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
        return url

    def reset_s3(self) -> None:
        httpx.post(f"{self.s3_endpoint}/moto-api/reset", timeout=10).raise_for_status()

    def reset_sandbox(self) -> None:
        httpx.post(f"{self.sandbox_url}/_sandbox/reset", timeout=10).raise_for_status()

    def sandbox_config(self, **settings: Any) -> Any:
        """Change the sandbox's behaviour (rate limit, latency, fault odds...); returns its answer."""
        r = httpx.post(f"{self.sandbox_url}/_sandbox/config", json=settings, timeout=10)
        r.raise_for_status()
        return r.json() if r.content else None

    def sandbox_ledger(self) -> dict[str, Any]:
        r = httpx.get(f"{self.sandbox_url}/_sandbox/ledger", timeout=10)
        r.raise_for_status()
        ledger: dict[str, Any] = r.json()
        return ledger

    def stop_redis(self, *, hard: bool = True) -> None:
        """SIGKILL Redis (hard, a crash) or SHUTDOWN NOSAVE it; AOF data written so far survives either."""
        svc = self._services.pop("redis", None)
        if svc is None:
            return
        if not hard and svc.proc.poll() is None:
            client = procs.no_retry_redis(svc.port, timeout=5)
            with contextlib.suppress(redis.RedisError):
                client.shutdown(nosave=True)
            client.close()
        procs.kill_group(svc.proc, signal.SIGTERM if not hard else signal.SIGKILL, timeout=10)

    def start_redis(self, *, appendonly: bool | None = None) -> None:
        """Start Redis again on the same port and dir (appendonly=None keeps the current mode)."""
        if "redis" in self._services:
            raise RuntimeError("redis is already running")
        if self._redis_port is None:
            raise RuntimeError("redis has no port yet: start the stack first")
        if appendonly is not None:
            self._redis_appendonly = appendonly
        self._spawn_service("redis", self._redis_port)
        self._await_service("redis", retry_on_port_clash=False)

    @property
    def redis_appendonly(self) -> bool:
        return self._redis_appendonly

    def restart_redis(self, appendonly: bool = True, *, hard: bool = True) -> None:
        """Stop and start Redis on the same port; with appendonly the data survives even a SIGKILL."""
        if appendonly and not self._redis_appendonly and "redis" in self._services:
            self._enable_aof()
        self.stop_redis(hard=hard)
        self.start_redis(appendonly=appendonly)

    def _enable_aof(self) -> None:
        # Turning AOF on live writes the current dataset to a new AOF in the background; a restart
        # before that rewrite ends would come back empty.
        client = self.redis_client()
        try:
            client.config_set("appendonly", "yes")

            def rewritten() -> bool:
                info: Any = client.info("persistence")  # typed as possibly awaitable before redis-py 8
                return not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]

            wait_until(rewritten, SERVICE_START_TIMEOUT_S, "redis AOF rewrite", log=self.log_path("redis"))
        finally:
            client.close()
        self._redis_appendonly = True

    def start_worker(self, extra_env: Mapping[str, str] | None = None, concurrency: int | None = None,
                     app: str = "worker") -> WorkerProc:
        """Start one `celery -A <app> worker` (threads pool) and wait until it logs "ready."."""
        w = self._spawn_worker(extra_env, concurrency, app)
        self._await_worker(w)
        return w

    def kill_worker(self, w: WorkerProc, sig: int = signal.SIGKILL, *, timeout: float = 30.0) -> None:
        """Signal the worker's whole process group and reap it (SIGKILL after `timeout` if it lingers)."""
        procs.kill_group(w.proc, sig, timeout=timeout)
        if w in self.workers:
            self.workers.remove(w)

    def stop_workers(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM) of every worker, SIGKILL for those still running after `timeout`."""
        leaders = [w.proc for w in self.workers]
        self.workers.clear()
        procs.stop_groups(leaders, timeout)

    def _spawn_service(self, name: str, port: int) -> None:
        if name == "redis":
            self._redis_port = port
            cmd = self._redis_command(port)
        elif name == "moto":
            cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        else:
            cmd = [sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", str(port), *self._sandbox_args]
        log = self.log_path(name)
        self._services[name] = Service(name, port, procs.spawn(cmd, log, cwd=_REPO), log)

    def _redis_command(self, port: int) -> list[str]:
        data = self.workdir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        if not self._redis_appendonly:
            # AOF files from an earlier AOF run are stale from now on; dropping them means a later
            # start with appendonly on cannot resurrect old data.
            shutil.rmtree(data / "appendonlydir", ignore_errors=True)
            (data / "appendonly.aof").unlink(missing_ok=True)
        return [
            procs.find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self._redis_appendonly else "no", "--dir", str(data),
            # As deploy/ runs it: a write acknowledged is a write that survives a SIGKILL.
            "--appendfsync", "always",
            "--maxmemory-policy", "noeviction",
        ]  # fmt: skip

    def _probe(self, svc: Service) -> Callable[[], bool]:
        if svc.name == "redis":
            return lambda: procs.redis_pings(svc.port)
        path = "/moto-api/" if svc.name == "moto" else "/_sandbox/ledger"
        return lambda: procs.http_ok(svc.url + path)

    def _await_service(self, name: str, *, retry_on_port_clash: bool) -> None:
        svc = self._services[name]
        what = f"{name} on 127.0.0.1:{svc.port}"
        try:
            wait_until(self._probe(svc), SERVICE_START_TIMEOUT_S, what, log=svc.log, proc=svc.proc)
        except ProcessExited as e:
            if not (retry_on_port_clash and "in use" in e.tail.lower()):
                raise
            # Someone took the port between free_port() and the bind: once more, on a new port.
            procs.kill_group(self._services.pop(name).proc)
            self._spawn_service(name, procs.free_port())
            self._await_service(name, retry_on_port_clash=False)

    def _spawn_worker(self, extra_env: Mapping[str, str] | None, concurrency: int | None,
                      app: str = "worker") -> WorkerProc:
        self._worker_seq += 1
        name = f"w{self._worker_seq}"
        cmd = [
            sys.executable, "-m", "celery", "-A", app, "worker", "--pool", "threads",
            "--concurrency", str(concurrency or self.concurrency), "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "-n", f"{name}@%h",
        ]  # fmt: skip
        # Logs are text unless the caller's environment or settings ask for JSON (IRLIVE_LOG_FORMAT's default).
        env = {**os.environ, **self.env, **(extra_env or {})}
        w = WorkerProc(name, procs.spawn(cmd, self.log_path(name), env=env, cwd=_REPO), self.log_path(name))
        self.workers.append(w)
        return w

    def _await_worker(self, w: WorkerProc) -> None:
        wait_until(
            lambda: procs.log_contains(w.log, "ready."),
            WORKER_START_TIMEOUT_S,
            f"celery worker {w.name}",
            log=w.log,
            proc=w.proc,
            interval=0.05,
        )
