"""`irlive config`: the effective settings, where each came from (secrets masked), and the workers' start checks."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from worker.config import S3Location, Settings, missing_extra
from worker.errors import ConfigError, IrliveError
from worker.ops.redact import mask_url

SCHEMA_VERSION = 1
MASK = "***"
# IRLIVE_* variables read by the tooling around irlive rather than by Settings: not typos.
TOOLING_VARS = frozenset({
    "IRLIVE_REDIS_SERVER", "IRLIVE_EMBEDDED_REDIS", "IRLIVE_VENV", "IRLIVE_LONG_FAULTS", "IRLIVE_FAULT_SEED",
    "IRLIVE_BIN", "IRLIVE_IMAGE",
})
# Field names whose values are secrets whatever they hold; URLs are masked separately (their credentials).
_SECRET_NAME = re.compile(r"(^|_)(api_key|secret|token|password|passphrase|private_key|credentials?)$|private")
_NAMED_VAR = re.compile(r"IRLIVE_[A-Z0-9_]+")
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)}


@dataclass
class Entry:
    """One setting as `irlive config` shows it."""

    var: str
    value: Any
    source: str  # "environment" or "default"
    valid: bool = True


@dataclass
class Report:
    """Everything `irlive config` prints; problems make it exit 1, notes do not."""

    entries: list[Entry]
    settings: Settings
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    redis: dict[str, Any] = field(default_factory=dict)
    # What to install for the configured way to pay, when its library is missing (workers refuse to start).
    missing_extra: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        vt_source = "environment" if self.settings.visibility_timeout_s is not None else "derived"
        return {
            "schema_version": SCHEMA_VERSION,
            "ok": self.ok,
            "settings": {e.var: {"value": e.value, "source": e.source, "valid": e.valid} for e in self.entries},
            "visibility_timeout_s": self.settings.visibility_timeout,
            "visibility_timeout_source": vt_source,
            "worst_chunk_s": round(self.settings.worst_chunk_s),
            "redis": self.redis,
            "problems": self.problems,
            "notes": self.notes,
            "missing_extra": self.missing_extra,
        }

    def render(self) -> str:
        width = max(len(e.var) for e in self.entries)
        lines = [f"{e.var:<{width}}  {_text(e.value):<40}  {e.source}{'' if e.valid else ' (INVALID)'}"
                 for e in self.entries]
        s = self.settings
        how = ("IRLIVE_VISIBILITY_TIMEOUT_S" if s.visibility_timeout_s is not None
               else "derived: twice the worst chunk time")
        lines += ["", f"visibility timeout  {s.visibility_timeout} s ({how}; worst chunk {s.worst_chunk_s:.0f} s)",
                  f"redis               {self.redis.get('summary', '')}"]
        lines += [""] + [f"problem: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]
        lines.append("ok: workers would start with these settings" if self.ok
                     else f"NOT OK: {len(self.problems)} problem(s) above")
        return "\n".join(lines)


def inspect_settings(env: Mapping[str, str], *, check_redis: bool = True) -> Report:
    """Read every setting the way the workers do, but keep going past a bad one so all are listed."""
    values: dict[str, Any] = {}
    entries: list[Entry] = []
    problems: list[str] = []
    for name, var in Settings.variables().items():
        raw = env.get(var)
        if raw is None or raw == "":
            entries.append(Entry(var, _shown(name, _DEFAULTS[name]), "default"))
            continue
        try:
            values[name] = Settings.parse_one(name, raw)
        except ConfigError as exc:
            problems.append(_masked_error(name, raw, str(exc)))
            entries.append(Entry(var, _shown(name, raw), "environment", valid=False))
            continue
        entries.append(Entry(var, _shown(name, values[name]), "environment"))
    settings = _checked(values, entries, problems)
    report = Report(entries, settings, problems)
    report.missing_extra = missing_extra(settings.payment_method)
    if report.missing_extra:
        problems.append(report.missing_extra)
    _check_visibility(settings, report)
    unknown = sorted(k for k in env if k.startswith("IRLIVE_") and k not in Settings.variables().values()
                     and k not in TOOLING_VARS)
    report.notes += [f"{k} is set but irlive reads no such setting (a typo?)" for k in unknown]
    report.redis = _check_redis(settings, report) if check_redis else {"checked": False, "summary": "not contacted "
                                                                       "(--no-redis)"}
    return report


def _checked(values: dict[str, Any], entries: list[Entry], problems: list[str]) -> Settings:
    """Settings.check() stops at the first bad value: put the value it complains about back to its default and
    check again, so one run lists every problem (the values shown stay what the environment said)."""
    for _ in range(len(values) + 1):
        try:
            return _valid(values)
        except ConfigError as exc:
            problems.append(str(exc))
            culprit = _culprit(values, str(exc))
            if culprit is None:
                break
            values.pop(culprit)
            for e in entries:
                if e.var == Settings.variables()[culprit]:
                    e.valid = False
    return Settings()


def _valid(values: dict[str, Any]) -> Settings:
    settings = Settings(**values)
    settings.check()
    return settings


def _culprit(values: dict[str, Any], message: str) -> str | None:
    """The environment value whose default makes this complaint go away: the variable the message names
    first, else (a limit set by another variable, e.g. MIN_IMAGE_SIDE above MAX_IMAGE_SIDE) any other."""
    named = [str(n).removeprefix("IRLIVE_").lower() for n in _NAMED_VAR.findall(message)]
    for name in [n for n in named if n in values] + [n for n in values if n not in named]:
        try:
            _valid({k: v for k, v in values.items() if k != name})
            return name
        except ConfigError as exc:
            if str(exc) != message:
                return name
    return None


def _check_visibility(settings: Settings, report: Report) -> None:
    # The same comparison the worker makes at start (worker.app.create_app), where it is only a warning; here
    # it is a problem because a shipped file that sets it low is exactly the mistake this command is for.
    if settings.visibility_timeout < 2 * settings.worst_chunk_s:
        report.problems.append(
            f"IRLIVE_VISIBILITY_TIMEOUT_S={settings.visibility_timeout} is under twice the worst chunk time "
            f"({settings.worst_chunk_s:.0f} s): the broker may hand a slow chunk to a second worker. Leave it unset "
            f"(derived: {Settings(**_without_vt(settings)).visibility_timeout} s with these settings)")


def _without_vt(settings: Settings) -> dict[str, Any]:
    return {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "visibility_timeout_s"}


def _check_redis(settings: Settings, report: Report) -> dict[str, Any]:
    """The durability check workers run at start (worker.ops.durability), with a short timeout."""
    from worker.ops.durability import require_durable
    from worker.seams.store import Store

    where = mask_url(settings.redis_url)
    try:
        store = Store.from_url(settings.redis_url, socket_timeout=3)
    except IrliveError as exc:
        report.problems.append(str(exc))
        return {"checked": False, "where": where, "summary": f"{where}: {exc}"}
    try:
        found = require_durable(store, allow_volatile=settings.allow_volatile_redis, where=store.where)
    except ConfigError as exc:
        report.problems.append(str(exc))
        return {"checked": True, "where": where, "summary": f"{where}: refused (see below)"}
    except IrliveError as exc:
        # Workers wait for an unreachable broker and check at their next start: not a settings problem.
        report.notes.append(f"Redis durability not checked: {exc}")
        return {"checked": False, "where": where, "summary": f"{where}: not reachable"}
    else:
        try:
            report.notes.append(_in_flight_note(settings, store))
        except IrliveError as exc:
            report.notes.append(f"calls in flight not worked out: {exc}")
    finally:
        store.close()
    if not found.checked:
        report.notes.append(f"Redis durability not checked: {found.why_unchecked}")
    elif found.problems():
        report.notes.append(f"Redis is volatile ({'; '.join(found.problems())}), accepted by "
                            "IRLIVE_ALLOW_VOLATILE_REDIS=true")
    return {"checked": found.checked, "where": where, "summary": f"{where}: {found.describe()}"}


def _in_flight_note(settings: Settings, store: Any) -> str:
    """Little's law for this rate: the calls in flight the seller's latency asks for, the cap the workers apply,
    and the worker threads in the fleet (each carries its chunk's calls, together while the limiter has room),
    from what the workers said."""
    from worker.flow.limiter import RateLimiter, RateSpec
    from worker.flow.pipeline import MAX_CALLS_PER_CHUNK
    from worker.keys import Keys
    from worker.ops import fleet

    keys = Keys(settings.key_prefix)
    limiter = RateLimiter(store, keys, RateSpec(settings.rate_limit_per_s, max_in_flight=settings.max_in_flight,
                                                listing=settings.pool_listing))
    latency = limiter.stats()["latency_s"]
    learned = latency == latency  # not NaN
    rate = settings.rate_limit_per_s
    need = math.ceil(rate * (latency if learned else 2.0))
    cap = limiter.in_flight_cap()
    how = (f"learned {latency:.2f} s" if learned else "2 s assumed until the seller's first answers")
    note = (f"in flight: {rate:g} calls/s x the seller's latency ({how}) needs {need} calls in flight; "
            f"the cap is {cap or 'none'}{' (auto)' if settings.max_in_flight is None else ''}")
    if 0 < cap < need:
        note += f"; IRLIVE_MAX_IN_FLIGHT={cap} keeps the fleet under the rate (leave it unset: auto)"
    workers = fleet.enforced(store, keys)
    threads = sum(int(w.get("threads") or 0) for w in workers)
    if threads:
        per_thread = max(1, min(MAX_CALLS_PER_CHUNK, settings.calls_per_chunk))
        note += (f"; the {len(workers)} running workers have {threads} threads, which carry up to "
                 f"{threads * per_thread} calls at once (a chunk's {per_thread} together)")
        if threads * per_thread < need:
            note += (f", fewer than {need}: start more workers or raise --concurrency")
    return note


def is_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _shown(name: str, value: Any) -> Any:
    """A value as it may be printed: secrets as ***, URL credentials masked, a webhook's path hidden."""
    if name == "max_in_flight" and value is None:
        return "auto"
    if value is None or value == "":
        return value
    if is_secret(name):
        return MASK
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, S3Location):
        return str(value)
    if name == "notify_url" and isinstance(value, str):
        # A webhook's path is often its secret (Slack, Teams): keep only where it goes.
        return re.sub(r"^([a-z]+://[^/?#]*).*$", rf"\1/{MASK}", mask_url(value))
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def _masked_error(name: str, raw: str, message: str) -> str:
    """A parse error quotes the raw value; a secret's value or a URL's credentials must not show."""
    if is_secret(name):
        return message.replace(repr(raw), repr(MASK)).replace(raw, MASK) if raw else message
    if "://" in raw:
        return message.replace(raw, mask_url(raw)).replace(raw.strip(), mask_url(raw.strip()))
    return message


def _text(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
