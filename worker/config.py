"""One frozen Settings object, read from IRLIVE_* environment variables once, at the entry points."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from worker.errors import ConfigError
from worker.ops.redact import mask_url

# The listing's tool endpoint, `{service_id}` filled in from IRLIVE_SERVICE_ID.
TOOL_PATH = "/api/tools/{service_id}"



_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,254}")


def is_bucket_name(text: str) -> bool:
    """An S3 bucket name as S3 (and legacy us-east-1 names, with capitals and "_") may have one."""
    return _BUCKET_NAME.fullmatch(text) is not None


# How long a call may wait in-process for its place in line and an in-flight slot before its chunk is deferred:
# a sleeping thread costs nothing, while a deferral makes the chunk's next delivery claim its images again (at
# the default 2 calls/s, 64 threads queue 32 s deep). Event work does not wait behind it: other calls queue at
# most 2 s ahead of an event call and step aside while event chunks wait (worker/flow/limiter.py).
MAX_LIMITER_WAIT_S = 60.0


def listing_name(service_id: str, tool_endpoint: str) -> str:
    """A listing: the service id tokens are bought for and the path they are spent at (a token bought for one is
    refused by another: switching IRLIVE_SERVICE_ID or IRLIVE_TOOL_PATH must not spend the old ones)."""
    return f"{service_id} {tool_endpoint}"


def pool_listing(service_id: str, tool_endpoint: str) -> str:
    """'' for the default listing (its pool keeps its old key), else the listing's name."""
    name = listing_name(service_id, tool_endpoint)
    return "" if name == DEFAULT_LISTING else name


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (no leading or trailing slash)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, value: str, name: str = "location") -> S3Location:
        # Literally, not as a URL: a prefix holding "#" or "?" is the prefix (urlsplit would drop the rest and
        # list a wider folder than asked).
        if not value.startswith("s3://"):
            raise ConfigError(f"{name}: expected s3://bucket/prefix, got {value!r}")
        bucket, _, prefix = value.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigError(f"{name}: expected s3://bucket/prefix, got {value!r}")
        if len(bucket) < 3:
            raise ConfigError(f"{name}: bucket name {bucket!r} is too short (3 characters at least)")
        if not is_bucket_name(bucket):
            raise ConfigError(f"{name}: {bucket!r} is not a bucket name (letters, digits, '.', '-' and '_')")
        return cls(bucket=bucket, prefix=prefix.strip("/"))

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class Settings:
    """Every knob irlive has; the env var of each field is IRLIVE_<FIELD NAME IN CAPITALS>."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    output: S3Location | None = None
    marketplace_url: str = "http://127.0.0.1:8402"
    service_id: str = "infrared-face-liveness-detection"
    # The tool endpoint's path; `{service_id}` stands for the service id payments are bought for. A deployment
    # that only exposes the legacy listing keeps the service id and names the legacy path here.
    tool_path: str = TOOL_PATH
    # How a call is paid and sent: `token` (X-Payment-Token on the HTTP tool endpoint), `mcp-token` (the
    # marketplace's MCP tool, `paymentToken`; tokens are bought and reconciled the same way for both), or `x402`
    # (an EIP-3009 authorization signed locally for each call, PAYMENT-SIGNATURE; no marketplace account).
    payment_method: str = "token"
    # x402: the payer's key (hex), or a file holding it; exactly one of the two with IRLIVE_PAYMENT_METHOD=x402.
    x402_private_key: str | None = field(default=None, repr=False)
    x402_key_file: str | None = None
    # x402: the chain paid on (CAIP-2), the assets that may be signed for (symbols or contract addresses the x402
    # SDK knows the decimals of), and, when set, the only address payments may go to.
    x402_network: str = "eip155:8453"
    x402_assets: tuple[str, ...] = ("USDC",)
    x402_pay_to: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_header: str = "X-API-Key"
    images_per_call: int = 10
    chunk_size: int = 50
    presign_ttl: int = 900
    max_price_cents: int = 20
    # Purchases in a row that may have been charged but brought no usable token before a run pauses.
    max_unknown_purchases: int = 3
    rate_limit_per_s: float = 2.0
    rate_burst: int = 1
    max_attempts: int = 5
    call_timeout_s: float = 30.0
    max_image_bytes: int = 10 * 1024 * 1024
    min_image_side: int = 64
    max_image_side: int = 4096
    visibility_timeout_s: int | None = None
    # Prometheus metrics on this port (/metrics) of every worker process group; unset serves none.
    metrics_port: int | None = None
    key_prefix: str = "irlive"
    daily_budget_usd: float | None = None
    token_pool_size: int = 2
    token_pool_low: int = 1
    max_deliveries: int = 10
    # Calls in flight across the fleet: None (`auto`) follows the rate and the seller's learned latency.
    max_in_flight: int | None = None
    rate_adaptive: bool = True
    allow_volatile_redis: bool = False
    max_retry_after_s: float = 300.0
    sqs_endpoint_url: str | None = None
    event_max_wait_s: float = 5.0
    event_run_window: int = 3600
    event_buckets: tuple[str, ...] = ()
    # `scan --since`: how far before the asked-for time (or the watermark) to list again, for clock skew and
    # objects that land late with an older LastModified; the done-set keeps the overlap free of charge.
    since_overlap_s: int = 900
    # Parallel listing of one source (prefixes split on the delimiter); 1 lists with one paginator.
    list_workers: int = 8
    # Where a run's end (done, failed, cancelled, paused for budget) is POSTed unless `scan --notify` says.
    notify_url: str | None = field(default=None, repr=False)
    # HMAC-SHA256 key of the X-Irlive-Signature header on those POSTs.
    notify_secret: str | None = field(default=None, repr=False)
    # The failure threshold (S3 Batch Operations' model): a run whose ended paid calls fail above this share,
    # once at least min_calls have ended, stops paying and ends failed; 1 turns it off.
    max_error_rate: float = 0.5
    min_calls: int = 20
    # Log lines as text (what a person reading a CLI expects, wherever stderr goes) unless asked: json (one event a
    # line, what the deploy files set for a collector), or auto (text at a terminal, JSON otherwise).
    log_format: str = "text"
    # report.html lists a `live` capture for a person to review when the seller's confidence (Rate, 0-100) is
    # below this.
    review_live_below: float = 80.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read IRLIVE_* variables; a bad value raises ConfigError naming the variable."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, var in cls.variables().items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[name] = cls.parse_one(name, raw)
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Each field's environment variable, in declaration order; an empty value counts as unset."""
        return {f.name: "IRLIVE_" + f.name.upper() for f in fields(cls)}

    @classmethod
    def parse_one(cls, name: str, raw: str) -> Any:
        """One field's value from its variable's text, as from_env reads it; ConfigError naming the variable."""
        return _PARSERS[name]("IRLIVE_" + name.upper(), raw)

    @property
    def tool_endpoint(self) -> str:
        """The path the paid calls are POSTed to."""
        return self.tool_path.replace("{service_id}", self.service_id)

    @property
    def pool_listing(self) -> str:
        """Which pool this fleet's prepaid tokens wait in: '' for the default listing, else the listing's name."""
        return pool_listing(self.service_id, self.tool_endpoint)

    def check(self) -> None:
        """Cross-field and range checks; raise ConfigError naming the variable."""
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()):
            # An HTTP header carries printable ASCII only; say so without printing the key.
            raise ConfigError("IRLIVE_API_KEY holds characters an HTTP header cannot carry (non-ASCII or control "
                              "characters): check for a stray space, quote or invisible character")
        self._check_x402()
        _in_range("IRLIVE_IMAGES_PER_CALL", self.images_per_call, 1, 10)
        _in_range("IRLIVE_CHUNK_SIZE", self.chunk_size, 1, 10_000)
        _in_range("IRLIVE_PRESIGN_TTL", self.presign_ttl, 60, 7 * 24 * 3600)
        _in_range("IRLIVE_MAX_PRICE_CENTS", self.max_price_cents, 0, 100_000)
        _in_range("IRLIVE_MAX_UNKNOWN_PURCHASES", self.max_unknown_purchases, 1, 1000)
        _in_range("IRLIVE_RATE_LIMIT_PER_S", self.rate_limit_per_s, 0.001, 10_000)
        _in_range("IRLIVE_RATE_BURST", self.rate_burst, 1, 1000)
        _in_range("IRLIVE_MAX_ATTEMPTS", self.max_attempts, 1, 100)
        _in_range("IRLIVE_CALL_TIMEOUT_S", self.call_timeout_s, 0.1, 600)
        _in_range("IRLIVE_MAX_IMAGE_BYTES", self.max_image_bytes, 1, 10 * 1024 * 1024)
        _in_range("IRLIVE_MIN_IMAGE_SIDE", self.min_image_side, 1, 10_000)
        _in_range("IRLIVE_MAX_IMAGE_SIDE", self.max_image_side, self.min_image_side, 100_000)
        if self.visibility_timeout_s is not None:
            _in_range("IRLIVE_VISIBILITY_TIMEOUT_S", self.visibility_timeout_s, 5, 7 * 24 * 3600)
        if self.metrics_port is not None:
            _in_range("IRLIVE_METRICS_PORT", self.metrics_port, 1, 65535)
        if self.daily_budget_usd is not None:
            _in_range("IRLIVE_DAILY_BUDGET_USD", self.daily_budget_usd, 0, 10_000_000)
        _in_range("IRLIVE_TOKEN_POOL_SIZE", self.token_pool_size, 0, 1000)
        if self.token_pool_size > 0:  # with no pool (0), LOW means nothing and its default must not get in the way
            _in_range("IRLIVE_TOKEN_POOL_LOW", self.token_pool_low, 0, self.token_pool_size)
        _in_range("IRLIVE_MAX_DELIVERIES", self.max_deliveries, 1, 1000)
        if self.max_in_flight is not None:
            _in_range("IRLIVE_MAX_IN_FLIGHT", self.max_in_flight, 0, 10_000)
        _in_range("IRLIVE_MAX_RETRY_AFTER_S", self.max_retry_after_s, 1, 24 * 3600)
        _in_range("IRLIVE_EVENT_MAX_WAIT_S", self.event_max_wait_s, 0.1, 3600)
        _in_range("IRLIVE_EVENT_RUN_WINDOW", self.event_run_window, 60, 7 * 24 * 3600)
        _in_range("IRLIVE_SINCE_OVERLAP_S", self.since_overlap_s, 0, 30 * 86400)
        _in_range("IRLIVE_LIST_WORKERS", self.list_workers, 1, 64)
        _in_range("IRLIVE_MAX_ERROR_RATE", self.max_error_rate, 0, 1)
        _in_range("IRLIVE_MIN_CALLS", self.min_calls, 1, 1_000_000)
        _in_range("IRLIVE_REVIEW_LIVE_BELOW", self.review_live_below, 0, 100)
        if 86400 % self.event_run_window and self.event_run_window % 86400:
            raise ConfigError(f"IRLIVE_EVENT_RUN_WINDOW={self.event_run_window} must divide a day (or be whole "
                              "days), so windows start at the same times every day: e.g. 600, 3600, 86400")

    def _check_x402(self) -> None:
        if self.payment_method != "x402":
            return
        if self.x402_private_key and self.x402_key_file:
            raise ConfigError("IRLIVE_X402_PRIVATE_KEY and IRLIVE_X402_KEY_FILE are both set: keep one")
        if not (self.x402_private_key or self.x402_key_file):
            raise ConfigError("IRLIVE_PAYMENT_METHOD=x402 signs with the payer's key: set IRLIVE_X402_KEY_FILE (a "
                              "file holding it) or IRLIVE_X402_PRIVATE_KEY")
        if self.x402_private_key is not None and not is_private_key(self.x402_private_key):
            # Said without the value: a near-miss of a key is still most of a key.
            raise ConfigError("IRLIVE_X402_PRIVATE_KEY is not a private key (64 hex digits, 0x optional)")

    @property
    def pool_size(self) -> int:
        """Tokens bought ahead of need: none for x402, whose signatures live seconds and are made per call."""
        return 0 if self.payment_method == "x402" else self.token_pool_size

    @property
    def daily_budget_cents(self) -> int | None:
        return None if self.daily_budget_usd is None else round(self.daily_budget_usd * 100)

    @property
    def calls_per_chunk(self) -> int:
        """The paid calls a whole chunk takes when every call is answered."""
        return math.ceil(self.chunk_size / self.images_per_call)

    @property
    def worst_chunk_s(self) -> float:
        """How long one chunk can take when every call fails slowly until its attempts run out."""
        calls = self.calls_per_chunk + 4  # + the splits that hunt a bad image
        per_attempt = self.call_timeout_s + 20.0 + MAX_LIMITER_WAIT_S  # the call, the backoff cap, the line
        validation = self.chunk_size * 2 * 2.0  # two ranged GETs per image, slow S3
        return calls * self.max_attempts * per_attempt + validation

    @property
    def visibility_timeout(self) -> int:
        """The broker's redelivery delay: IRLIVE_VISIBILITY_TIMEOUT_S, else twice the worst chunk time."""
        if self.visibility_timeout_s is not None:
            return self.visibility_timeout_s
        return max(600, math.ceil(2 * self.worst_chunk_s))

    def require_output(self) -> S3Location:
        if self.output is None:
            raise ConfigError("IRLIVE_OUTPUT is not set: give s3://bucket/prefix where manifests go")
        return self.output

    def enforced_view(self) -> dict[str, Any]:
        """What the workers enforce on money (recorded in each run manifest by the worker that finalises it)."""
        return {
            "max_price_cents": self.max_price_cents,
            "max_unknown_purchases": self.max_unknown_purchases,
            "images_per_call": self.images_per_call,
            "max_attempts": self.max_attempts,
            "daily_budget_cents": self.daily_budget_cents,
            "rate_limit_per_s": self.rate_limit_per_s,
            "token_pool_size": self.pool_size,
        }

    def public_view(self) -> dict[str, Any]:
        """The settings as a manifest or a run record may hold them: no secrets, no URL credentials."""
        view: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("api_key", "notify_secret", "x402_private_key"):
                value = "***" if value else None
            elif f.name == "notify_url" and value:
                # A webhook's path is often its secret (Slack, Teams): keep only where it goes.
                parts = urlsplit(value)
                value = f"{parts.scheme}://{parts.hostname or ''}/***"
            elif isinstance(value, S3Location):
                value = str(value)
            elif isinstance(value, str) and "://" in value:
                value = mask_url(value)
            view[f.name] = value
        return view

    def producer_view(self) -> dict[str, Any]:
        """What a scan records of its own settings: money settings are the workers' (see enforced_view)."""
        enforced = self.enforced_view()
        return {k: v for k, v in self.public_view().items() if k not in enforced and k != "daily_budget_usd"}


def _in_range(var: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{var}={value} is out of range: expected {low} to {high}")


def _typed(kind: type[int] | type[float], label: str) -> Callable[[str, str], Any]:
    def parse(var: str, raw: str) -> int | float:
        return _number(var, raw, kind, label)

    return parse


def _number(var: str, raw: str, kind: type[int] | type[float], label: str, scale: float = 1,
            shown: str | None = None) -> int | float:
    """The one reader of every numeric setting: a finite number of `kind` (times `scale`), or a ConfigError
    naming the variable. `inf`, `nan` and `1e400` (which float() reads as inf) are not numbers a setting can
    hold; int() would raise OverflowError on them, round() too."""
    text = raw.strip()
    try:
        value = kind(text) if kind is int else float(text) * scale
    except ValueError:
        raise ConfigError(f"{var}={shown or raw!r} is not {label}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{var}={shown or raw!r} is not {label}: it must be a finite number")
    return value


def _url(var: str, raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https", "redis", "rediss", "unix") or not (parts.netloc or parts.path):
        raise ConfigError(f"{var}={raw!r} is not a URL")
    return raw.strip().rstrip("/")


SENTINEL_PORT = 26379
SENTINEL_FORM = "sentinel://[:password@]host:26379[,host:26379...]/db?master_name=NAME"
# Defaults of the sentinel URL's own options; see SentinelTarget.
SENTINEL_WAIT_REPLICAS = 1
SENTINEL_WAIT_TIMEOUT_MS = 500


@dataclass(frozen=True)
class SentinelTarget:
    """What a `sentinel://` IRLIVE_REDIS_URL names: the sentinels to ask, the master's name, the database.

    The URL's user and password are the Redis nodes' (as on redis://); `sentinel_password` in the query is the
    sentinels' own, when they require one. `wait_replicas` (default 1) is how many replicas each write must
    reach (Redis WAIT, within `wait_timeout_ms`) before irlive takes it as made: a write only the failed master
    held is lost with it, so money is never moved on the strength of one; a write that does not reach them
    fails as Redis unavailable and is retried. 0 turns the wait off (and accepts losing the last writes).
    """

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    wait_replicas: int = SENTINEL_WAIT_REPLICAS
    wait_timeout_ms: int = SENTINEL_WAIT_TIMEOUT_MS

    @classmethod
    def parse(cls, url: str, var: str = "IRLIVE_REDIS_URL") -> SentinelTarget:
        """ConfigError naming `var` (and never the password) for anything but SENTINEL_FORM."""
        text = url.strip()
        shown = mask_url(text)
        scheme, sep, rest = text.partition("://")
        if scheme.lower() != "sentinel" or not sep:
            raise ConfigError(f"{var}={shown!r} is not a sentinel URL: expected {SENTINEL_FORM}")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, pw = userinfo.partition(":")
            username, password = (unquote(user) or None), (unquote(pw) if colon else None)
        sentinels = tuple(_host_port(var, shown, h) for h in hosts.split(",") if h.strip())
        if not sentinels:
            raise ConfigError(f"{var}={shown!r} names no sentinel: expected {SENTINEL_FORM}")
        db = path.strip("/") or "0"
        if not db.isdigit():
            raise ConfigError(f"{var}={shown!r}: the database ({db!r}) must be a number, e.g. {SENTINEL_FORM}")
        options = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(options) - {"master_name", "sentinel_password", "wait_replicas", "wait_timeout_ms"})
        if unknown:
            raise ConfigError(f"{var}={shown!r}: unknown option(s) {', '.join(unknown)}; a sentinel URL takes "
                              "master_name, sentinel_password, wait_replicas, wait_timeout_ms")
        master = options.get("master_name", "").strip()
        if not master:
            raise ConfigError(f"{var}={shown!r} names no master: add ?master_name=NAME (the name the sentinels "
                              f"monitor, `sentinel monitor NAME ...` in their config): {SENTINEL_FORM}")
        wait_replicas = _option_int(var, shown, options, "wait_replicas", SENTINEL_WAIT_REPLICAS, 0, 16)
        wait_timeout = _option_int(var, shown, options, "wait_timeout_ms", SENTINEL_WAIT_TIMEOUT_MS, 1, 60_000)
        return cls(sentinels, master, int(db), username, password, options.get("sentinel_password") or None,
                   wait_replicas, wait_timeout)

    @property
    def where(self) -> str:
        """For messages: the master's name and the sentinels, never a password."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
        return f"master {self.master_name} via sentinels {hosts} db {self.db}"


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith("sentinel://")


def _host_port(var: str, shown: str, text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [ipv6]:port
        host, _, tail = text[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ConfigError(f"{var}={shown!r} names a sentinel with no host: expected {SENTINEL_FORM}")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{var}={shown!r} has a sentinel port that is not a port number ({port_text!r})")
    return host, int(port_text)


def _option_int(var: str, shown: str, options: Mapping[str, str], name: str, default: int, low: int,
                high: int) -> int:
    raw = options.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ConfigError(f"{var}={shown!r}: {name}={raw!r} is not a whole number from {low} to {high}")
    return int(raw)


def _redis_url(var: str, raw: str) -> str:
    """redis://[user:password@]host[:port][/db], rediss://..., unix:///path[?db=N], or SENTINEL_FORM."""
    text = raw.strip()
    if is_sentinel_url(text):
        SentinelTarget.parse(text, var)
        return text
    shown = mask_url(text)
    try:
        parts = urlsplit(text)
    except ValueError:  # "Invalid IPv6 URL": a "[" or "]" the parser took for an IPv6 host
        raise ConfigError(f"{var}={shown!r} cannot be read as a URL: percent-encode any of [ ] / ? # @ in the "
                          "user name or password (e.g. %5B for [)") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{var}={shown!r} is not a Redis URL: expected redis://host:6379/0 (or rediss://, "
                          f"unix://, or {SENTINEL_FORM})")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{var}={shown!r} has a port that is not a number") from None
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{var}={shown!r} names no socket path: expected unix:///path/to/redis.sock")
        return text
    if not parts.hostname:
        raise ConfigError(f"{var}={shown!r} names no host: expected redis://host:6379/0")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"{var}={shown!r}: the database ({db!r}) must be a number, e.g. redis://host:6379/0")
    del port
    return text


def _duration(var: str, raw: str) -> int:
    """Seconds, or a number with a unit: 90s, 10m, 1h, 1d."""
    text = raw.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:], 0)
    number = text[:-1] if scale else text
    return round(_number(var, number, float, "a duration (e.g. 3600, 10m, 1h, 1d)", scale or 1, shown=raw))


def _names(var: str, raw: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def _bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var}={raw!r} is not a yes/no value (true/false, 1/0)")


def _text(var: str, raw: str) -> str:
    return raw.strip()


def _auto_or(parse: Callable[[str, str], Any]) -> Callable[[str, str], Any]:
    """`auto` (None: the worker works it out), else what `parse` reads."""
    def read(var: str, raw: str) -> Any:
        return None if raw.strip().lower() == "auto" else parse(var, raw)

    return read


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(var: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ConfigError(f"{var}={raw!r} is not one of {', '.join(allowed)}")
        return value

    return parse


def _tool_path(var: str, raw: str) -> str:
    path = raw.strip()
    # Written into the request line as is: a path of printable ASCII, no query, no fragment, no other template.
    if not re.fullmatch(r"/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*(\{service_id\}[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?", path):
        raise ConfigError(f"{var}={raw!r} is not a URL path (it starts with /, may hold {{service_id}} once, and "
                          "carries no query, fragment, space or other template)")
    return path


PAYMENT_METHODS = ("token", "mcp-token", "x402")
# The runtime extra each way to pay needs beyond a plain install, and the modules it brings (import names).
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mcp-token": ("mcp", ("mcp",)),
    "x402": ("x402", ("x402", "eth_account")),
}
_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_CAIP2 = re.compile(r"eip155:[0-9]{1,12}")


def is_private_key(text: str) -> bool:
    return _PRIVATE_KEY.fullmatch(text.strip()) is not None


def missing_extra(method: str) -> str | None:
    """What to install for `method` when its library is absent (found without importing it), else None."""
    import importlib.util

    extra, modules = EXTRAS.get(method, ("", ()))
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return (f"IRLIVE_PAYMENT_METHOD={method} needs the {extra!r} extra (module {name!r} is not installed): "
                    f"pip install 'irlive[{extra}]'")
    return None


def _payment_method(var: str, raw: str) -> str:
    return _choice(*PAYMENT_METHODS)(var, raw)


def _private_key(var: str, raw: str) -> str:
    return raw.strip()


def _network(var: str, raw: str) -> str:
    value = raw.strip()
    if not _CAIP2.fullmatch(value):
        raise ConfigError(f"{var}={raw!r} is not a CAIP-2 EVM network: e.g. eip155:8453 (Base) or eip155:84532 "
                          "(Base Sepolia)")
    return value


def _address(var: str, raw: str) -> str:
    value = raw.strip()
    if not _ADDRESS.fullmatch(value):
        raise ConfigError(f"{var}={raw!r} is not an address (0x and 40 hex digits)")
    return value


def _assets(var: str, raw: str) -> tuple[str, ...]:
    names = _names(var, raw)
    if not names:
        raise ConfigError(f"{var}={raw!r} names no asset: e.g. USDC")
    return names


def _output(var: str, raw: str) -> S3Location:
    return S3Location.parse(raw.strip(), var)


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "redis_url": _redis_url,
    "s3_endpoint_url": _url,
    "s3_region": _text,
    "output": _output,
    "marketplace_url": _url,
    "service_id": _text,
    "tool_path": _tool_path,
    "payment_method": _payment_method,
    "x402_private_key": _private_key,
    "x402_key_file": _text,
    "x402_network": _network,
    "x402_assets": _assets,
    "x402_pay_to": _address,
    "api_key": _text,
    "api_key_header": _text,
    "images_per_call": _typed(int, "a whole number"),
    "chunk_size": _typed(int, "a whole number"),
    "presign_ttl": _typed(int, "a whole number of seconds"),
    "max_price_cents": _typed(int, "a whole number of cents"),
    "max_unknown_purchases": _typed(int, "a whole number of purchases"),
    "rate_limit_per_s": _typed(float, "a number of calls per second"),
    "rate_burst": _typed(int, "a whole number"),
    "max_attempts": _typed(int, "a whole number"),
    "call_timeout_s": _typed(float, "a number of seconds"),
    "max_image_bytes": _typed(int, "a whole number of bytes"),
    "min_image_side": _typed(int, "a whole number of pixels"),
    "max_image_side": _typed(int, "a whole number of pixels"),
    "visibility_timeout_s": _typed(int, "a whole number of seconds"),
    "metrics_port": _typed(int, "a TCP port number"),
    "key_prefix": _text,
    "daily_budget_usd": _typed(float, "an amount in US dollars"),
    "token_pool_size": _typed(int, "a whole number of tokens"),
    "token_pool_low": _typed(int, "a whole number of tokens"),
    "max_deliveries": _typed(int, "a whole number"),
    "max_in_flight": _auto_or(_typed(int, "a whole number of calls (0 = no cap) or auto")),
    "rate_adaptive": _bool,
    "allow_volatile_redis": _bool,
    "max_retry_after_s": _typed(float, "a number of seconds"),
    "sqs_endpoint_url": _url,
    "event_max_wait_s": _typed(float, "a number of seconds"),
    "event_run_window": _duration,
    "event_buckets": _names,
    "since_overlap_s": _duration,
    "list_workers": _typed(int, "a whole number of listing threads"),
    "notify_url": _url,
    "notify_secret": _text,
    "max_error_rate": _typed(float, "a share between 0 and 1 (0.5 = 50 %)"),
    "min_calls": _typed(int, "a whole number of calls"),
    "log_format": _choice("auto", "json", "text"),
    "review_live_below": _typed(float, "a confidence between 0 and 100"),
}


DEFAULT_LISTING = listing_name(Settings.service_id, TOOL_PATH.replace("{service_id}", Settings.service_id))
