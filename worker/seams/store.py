"""The Redis seam: one client, Lua scripts loaded from their files, every redis-py error translated at the call.

Callers never see `redis.exceptions`: a connection or timeout, a read-only replica during a failover, a
server still loading, a busy script, or a write refused under `maxmemory` each become one class of the
error tree. Messages never carry the server's text, which can echo command arguments (tokens).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar

import redis
from redis import exceptions as rx

from worker.errors import ConfigError, IrliveError, StoreRefused, StoreUnavailable
from worker.ops.redact import mask_url, redact

T = TypeVar("T")
log = logging.getLogger("irlive.store")
# First word of a Redis error reply -> what it means for us.
_UNAVAILABLE_CODES = ("READONLY", "MASTERDOWN", "LOADING", "TRYAGAIN", "BUSY", "CLUSTERDOWN", "NOREPLICAS",
                      "UNBLOCKED", "NOTBUSY")
_REFUSED_CODES = ("OOM",)
_ACCESS_CODES = ("NOPERM", "NOAUTH", "WRONGPASS")


def script_source(package: str, name: str) -> str:
    """The text Redis runs for `worker/<package>/scripts/<name>.lua`: the file, with each `--#include NAME`
    line replaced by scripts/lib/NAME.lua (Redis runs one self-contained script, so a rule several scripts
    apply alike, such as the end of a paid call, is written once and pasted in here)."""
    scripts = resources.files(f"worker.{package}").joinpath("scripts")
    text = scripts.joinpath(f"{name}.lua").read_text()
    return "".join(scripts.joinpath("lib", line.split()[1] + ".lua").read_text()
                   if line.startswith("--#include ") else line for line in text.splitlines(keepends=True))


class StoreBug(IrliveError):
    """Redis answered an error that is ours to fix (a script or a command used wrongly)."""


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


class Script:
    """One Lua script from a `.lua` file, run by EVALSHA (redis-py reloads it if the server forgot it)."""

    def __init__(self, client: redis.Redis, name: str, source: str) -> None:
        self.name = name
        self._script = client.register_script(source)

    def __call__(self, keys: Sequence[str], args: Sequence[Any] = ()) -> Any:
        with translated(f"script {self.name}"):
            return self._script(keys=list(keys), args=list(args))


class Pipeline:
    """A redis-py pipeline whose execute() is translated; commands queue as on redis-py's."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._pipe, name)

        @functools.wraps(method)
        def queue(*args: Any, **kwargs: Any) -> Pipeline:
            method(*args, **kwargs)
            return self

        return queue

    def execute(self) -> list[Any]:
        with translated("pipeline"):
            result: list[Any] = self._pipe.execute()
            return result


class Store:
    """The only place redis-py is called for irlive's state; commands are redis-py's, errors are ours.

    The client decodes responses to str.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._scripts: dict[str, Script] = {}

    @classmethod
    def from_url(cls, url: str, *, socket_timeout: float | None = 30.0) -> Store:
        try:
            client = redis.Redis.from_url(url, decode_responses=True, health_check_interval=30,
                                          socket_timeout=socket_timeout, socket_connect_timeout=10)
        except ValueError:
            raise ConfigError(f"IRLIVE_REDIS_URL={mask_url(url)!r} is not a Redis URL "
                              "(redis://[:password@]host:port/db, rediss:// or unix://)") from None
        return cls(client)

    @property
    def where(self) -> str:
        """Which Redis this is, for messages: host, port and db, never the password."""
        kw = self.client.connection_pool.connection_kwargs
        if "path" in kw:
            return f"unix://{kw['path']} db {kw.get('db', 0)}"
        return f"{kw.get('host', '?')}:{kw.get('port', '?')} db {kw.get('db', 0)}"

    def script(self, package: str, name: str) -> Script:
        """The script `worker/<package>/scripts/<name>.lua`, loaded once per Store."""
        key = f"{package}/{name}"
        if key not in self._scripts:
            self._scripts[key] = Script(self.client, key, script_source(package, name))
        return self._scripts[key]

    def pipeline(self, transaction: bool = True) -> Pipeline:
        return Pipeline(self.client.pipeline(transaction=transaction))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.client, name)
        if not callable(method):
            raise AttributeError(name)

        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> Any:
            with translated(name):
                return method(*args, **kwargs)

        return call

    def close(self) -> None:
        self.client.close()

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
