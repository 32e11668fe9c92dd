"""The Redis seam: one client, Lua scripts loaded from their files, every redis-py error translated at the call.

Callers never see `redis.exceptions`: a connection or timeout, a read-only replica during a failover, a
server still loading, a busy script, or a write refused under `maxmemory` each become one class of the
error tree. Messages never carry the server's text, which can echo command arguments (tokens).

With a `sentinel://` URL the client finds the master through the sentinels (redis-py's SentinelConnectionPool)
and finds the new one after a failover by itself: the failover window (the old master gone, no master known
yet, a demoted master answering READONLY, a promoted one still LOADING) surfaces as StoreUnavailable, which
the callers' retries and `Store.persist` already ride out. Each write also waits (Redis WAIT) until a replica
holds it, so what irlive has taken as written survives the failover; see `Replication`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar

import redis
from redis import exceptions as rx
from redis.sentinel import Sentinel

from worker.config import SentinelTarget, is_sentinel_url
from worker.errors import ConfigError, IrliveError, StoreBug, StoreRefused, StoreUnavailable
from worker.ops.redact import mask_url, redact

T = TypeVar("T")
log = logging.getLogger("irlive.store")
# First word of a Redis error reply -> what it means for us.
_UNAVAILABLE_CODES = ("READONLY", "MASTERDOWN", "LOADING", "TRYAGAIN", "BUSY", "CLUSTERDOWN", "NOREPLICAS",
                      "UNBLOCKED", "NOTBUSY")
_REFUSED_CODES = ("OOM",)
_ACCESS_CODES = ("NOPERM", "NOAUTH", "WRONGPASS")
# Commands irlive writes with outside scripts and pipelines: each waits for its replicas (see Replication).
_WRITE_COMMANDS = frozenset((
    "set", "setnx", "setex", "psetex", "getset", "getdel", "mset", "msetnx", "incr", "incrby", "decr", "decrby",
    "delete", "unlink", "expire", "pexpire", "expireat", "pexpireat", "rename", "renamenx", "copy",
    "hset", "hsetnx", "hincrby", "hincrbyfloat", "hdel", "sadd", "srem", "smove", "spop",
    "zadd", "zrem", "zincrby", "zremrangebyscore", "zremrangebyrank", "zpopmin", "zpopmax",
    "lpush", "rpush", "lpop", "rpop", "lrem", "ltrim", "lset", "linsert", "lmove", "rpoplpush", "xadd",
))
# A replica missing is said at most this often per process (every write fails meanwhile; one line is enough).
_ALONE_WARN_S = 30.0


def script_source(package: str, name: str) -> str:
    """The text Redis runs for `worker/<package>/scripts/<name>.lua`: the file, with each `--#include NAME`
    line replaced by scripts/lib/NAME.lua (Redis runs one self-contained script, so a rule several scripts
    apply alike, such as the end of a paid call, is written once and pasted in here)."""
    scripts = resources.files(f"worker.{package}").joinpath("scripts")
    text = scripts.joinpath(f"{name}.lua").read_text()
    return "".join(scripts.joinpath("lib", line.split()[1] + ".lua").read_text()
                   if line.startswith("--#include ") else line for line in text.splitlines(keepends=True))


def script_sha(package: str, name: str) -> str:
    """The SHA-1 EVALSHA names a script by (what MONITOR, SLOWLOG and fault proxies see of it)."""
    return hashlib.sha1(script_source(package, name).encode()).hexdigest()


def translate(exc: rx.RedisError, what: str = "Redis") -> IrliveError:
    """The error-tree class of a redis-py error; the text names the kind only, never the server's words."""
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return ConfigError(f"{what}: Redis refused our credentials or ACL (check IRLIVE_REDIS_URL)")
    if isinstance(exc, rx.OutOfMemoryError):
        return StoreRefused(f"{what}: Redis is out of memory (maxmemory) and refused a write")
    if isinstance(exc, rx.ReadOnlyError):
        return StoreUnavailable(f"{what}: Redis is read-only (a replica, or a failover under way)")
    if isinstance(exc, rx.ConnectionError | rx.TimeoutError):
        return StoreUnavailable(f"{what}: Redis unreachable ({type(exc).__name__})")
    words = str(exc).replace("-", " ").split()
    # A script's error carries the code of the command that failed inside it, after the script's own words.
    for word in words[:12]:
        if word in _REFUSED_CODES:
            return StoreRefused(f"{what}: Redis is out of memory (maxmemory) and refused a write")
        if word in _UNAVAILABLE_CODES:
            return StoreUnavailable(f"{what}: Redis is not accepting writes right now ({word})")
        if word in _ACCESS_CODES:
            return ConfigError(f"{what}: Redis refused the command ({word}); check IRLIVE_REDIS_URL and its ACL")
    code = words[0] if words and words[0].isupper() else type(exc).__name__
    text = str(exc)
    if "user_script:" in text:
        # A script's own runtime error names a line and a Lua message, never a command's arguments.
        return StoreBug(f"{what}: script error {redact(text[text.index('user_script:'):])[:200]}")
    return StoreBug(f"{what}: Redis answered an error ({code})")


@contextmanager
def translated(what: str = "Redis") -> Iterator[None]:
    try:
        yield
    except rx.RedisError as exc:
        raise translate(exc, what) from None


class Replication:
    """Redis WAIT after each write, on the write's own connection: a write counts as made only once `replicas`
    replicas hold it.

    Redis replicates asynchronously and a failover promotes a replica: whatever the old master had not passed
    on is gone, though it acknowledged it, and a master the sentinels have already replaced (alive, but cut
    off) keeps acknowledging writes that are discarded when it is demoted. So a write whose WAIT comes back
    short is in doubt, exactly like one whose connection broke after sending: it fails with StoreUnavailable,
    nothing is paid on its strength, and the caller's retry (or Store.persist) makes it again, idempotently,
    wherever the master is by then. The price: with no replica in reach, irlive writes nothing (the run
    holds, paid answers wait in Store.persist) until one is back, or until `wait_replicas=0` says otherwise.
    """

    def __init__(self, replicas: int, timeout_ms: int) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.short = 0  # waits that came back with fewer replicas than wanted
        self._warned_at = -_ALONE_WARN_S

    def execute(self, pipe: Any) -> list[Any]:
        """Run a non-transactional redis-py pipeline with a WAIT after its commands; their results."""
        pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
        results: list[Any] = pipe.execute()
        acked = int(results.pop())
        if acked < self.replicas:
            self.short += 1
            if time.monotonic() - self._warned_at >= _ALONE_WARN_S:
                self._warned_at = time.monotonic()
                log.warning("Redis: writes reach %s of the %s replicas wanted (wait_replicas in IRLIVE_REDIS_URL) "
                            "within %s ms; holding them until enough replicas answer", acked, self.replicas,
                            self.timeout_ms)
            raise StoreUnavailable(f"Redis: a write reached {acked} of {self.replicas} replicas within "
                                   f"{self.timeout_ms} ms (a failover under way, or a replica down)")
        return results


class Script:
    """One Lua script from a `.lua` file, run by EVALSHA (redis-py reloads it if the server forgot it)."""

    def __init__(self, client: redis.Redis, name: str, source: str, replication: Replication | None = None
                 ) -> None:
        self.name = name
        self._client = client
        self._script = client.register_script(source)
        self._replication = replication

    def __call__(self, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        with translated(f"script {self.name}"):
            if self._replication is None:
                return self._script(keys=list(keys), args=list(args))
            pipe = self._client.pipeline(transaction=False)
            self._script(keys=list(keys), args=list(args), client=pipe)
            return self._replication.execute(pipe)[0]


class Pipeline:
    """A redis-py pipeline whose execute() is translated; commands queue as on redis-py's."""

    def __init__(self, pipe: Any, replication: Replication | None = None) -> None:
        self._pipe = pipe
        # WAIT cannot go inside MULTI, and after EXEC redis-py may hand the next command another connection:
        # only non-transactional pipelines wait (irlive's one transactional pipeline restores an archived
        # chunk from S3, which can be done again).
        self._replication = None if getattr(pipe, "transaction", False) else replication
        # A pipeline of reads waits for no replica (a replica down must not fail them).
        self._writes = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._pipe, name)
        writes = name in _WRITE_COMMANDS

        @functools.wraps(method)
        def queue(*args: Any, **kwargs: Any) -> Pipeline:
            method(*args, **kwargs)
            self._writes = self._writes or writes
            return self

        return queue

    def execute(self) -> list[Any]:
        with translated("pipeline"):
            if self._replication is not None and self._writes and len(self._pipe):
                return self._replication.execute(self._pipe)
            result: list[Any] = self._pipe.execute()
            return result


class Store:
    """The only place redis-py is called for irlive's state; commands are redis-py's, errors are ours.

    The client decodes responses to str.
    """

    def __init__(self, client: redis.Redis, *, sentinel: Any = None,
                 target: SentinelTarget | None = None) -> None:
        self.client = client
        self._scripts: dict[str, Script] = {}
        self._sentinel = sentinel
        self._target = target
        self.replication = (Replication(target.wait_replicas, target.wait_timeout_ms)
                            if target is not None and target.wait_replicas > 0 else None)

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float | None = 30.0) -> Store:
        if is_sentinel_url(url):
            return cls.from_sentinel(SentinelTarget.parse(url), socket_timeout=socket_timeout)
        try:
            client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                          socket_timeout=socket_timeout, socket_connect_timeout=10)
        except ValueError:
            raise ConfigError(f"IRLIVE_REDIS_URL={mask_url(url)!r} is not a Redis URL "
                              "(redis://[:password@]host:port/db, rediss://, unix:// or sentinel://)") from None
        return cls(client)

    @classmethod
    def from_sentinel(cls, target: SentinelTarget, *, socket_timeout: float | None = 30.0) -> Store:
        """A client of whichever node the sentinels name master now (asked again after every failover)."""
        # The sentinels answer small queries: fail over to the next one quickly rather than wait out a dead one.
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        if target.sentinel_password:
            sentinel_kwargs["password"] = target.sentinel_password
        # Typed from redis-py 8.2 on only; the lock holds 7.4 (pyproject.toml [tool.uv]) and --latest the newest.
        factory: Any = Sentinel
        sentinel: Any = factory(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
        client = sentinel.master_for(target.master_name, db=target.db, username=target.username,
                                     password=target.password, decode_responses=True, health_check_interval=30,
                                     socket_timeout=socket_timeout, socket_connect_timeout=10)
        return cls(client, sentinel=sentinel, target=target)

    @property
    def where(self) -> str:
        """Which Redis this is, for messages: host, port and db, never the password."""
        if self._target is not None:
            return self._target.where
        kw = self.client.connection_pool.connection_kwargs
        if "path" in kw:
            return f"unix://{kw['path']} db {kw.get('db', 0)}"
        return f"{kw.get('host', '?')}:{kw.get('port', '?')} db {kw.get('db', 0)}"

    def master_address(self) -> tuple[str, int] | None:
        """The master the sentinels name now (None without sentinels); StoreUnavailable if none can say."""
        if self._sentinel is None or self._target is None:
            return None
        with translated("sentinel"):
            host, port = self._sentinel.discover_master(self._target.master_name)
            return str(host), int(port)

    def replicas(self) -> list[Store]:
        """A Store on each replica the sentinels list as up (none without sentinels): a replica is the next
        master, so what it keeps matters as much as what the master keeps. Close each after use."""
        if self._sentinel is None or self._target is None:
            return []
        with translated("sentinel"):
            found = self._sentinel.discover_slaves(self._target.master_name)
        t = self._target
        return [Store(redis.Redis(host=str(host), port=int(port), db=t.db, username=t.username, password=t.password,
                                  decode_responses=True, socket_timeout=10.0, socket_connect_timeout=10.0))
                for host, port in found]

    def script(self, package: str, name: str) -> Script:
        """The script `worker/<package>/scripts/<name>.lua`, loaded once per Store."""
        key = f"{package}/{name}"
        if key not in self._scripts:
            self._scripts[key] = Script(self.client, key, script_source(package, name), self.replication)
        return self._scripts[key]

    def replicas_online(self) -> tuple[int, int] | None:
        """(replicas of the master online now, replicas each write waits for), when writes wait for any
        (Sentinel with wait_replicas > 0); None otherwise. Fewer online than wanted: every write is held."""
        if self.replication is None:
            return None
        with translated("INFO replication"):
            info: Any = self.client.info("replication")
        online = sum(1 for name, value in info.items()
                     if name.startswith("slave") and name[5:].isdigit() and isinstance(value, dict)
                     and value.get("state") == "online")
        return online, self.replication.replicas

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self.client.pipeline(transaction=transaction), self.replication)

    def hgetall_many(self, keys: list[str], batch: int = 500) -> list[dict[str, str]]:
        """HGETALL of each key, in order, `batch` keys to a pipelined round trip (a run's end reads every
        payment and every chunk's progress)."""
        found: list[dict[str, str]] = []
        for at in range(0, len(keys), batch):
            pipe = self.pipeline(transaction=False)
            for key in keys[at:at + batch]:
                pipe.hgetall(key)
            found.extend(pipe.execute())
        return found

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        if not callable(method):
            raise AttributeError(name)
        replication = self.replication if name in _WRITE_COMMANDS else None

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with translated(name):
                if replication is None:
                    return method(*args, **kwargs)
                pipe = self.client.pipeline(transaction=False)
                getattr(pipe, name)(*args, **kwargs)
                return replication.execute(pipe)[0]

        return call

    def close(self) -> None:
        self.client.close()
        if self._sentinel is not None:
            close_sentinel(self._sentinel)

    def persist(self, write: Callable[[], T], hold_s: float, what: str) -> T:
        """Run an idempotent write, retrying over Redis trouble for up to `hold_s`: for what must not be lost
        once money has moved (an answer, a purchase). Raises the last StoreUnavailable after that."""
        deadline = time.monotonic() + hold_s
        delay = 0.1
        warned = False
        while True:
            try:
                return write()
            except StoreUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if not warned:
                    log.warning("%s: %s; holding it and retrying for up to %.0fs", what, exc, hold_s)
                    warned = True
                time.sleep(delay)
                delay = min(5.0, delay * 2)


def close_sentinel(sentinel: Any) -> None:
    """Close the client a redis-py Sentinel keeps for each sentinel node (its own close() is 8.1's and later)."""
    close = getattr(sentinel, "close", None)
    if callable(close):
        close()
        return
    for node in getattr(sentinel, "sentinels", ()):
        node.close()
