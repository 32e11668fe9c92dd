"""Refuse a Redis that would forget money: no persistence (AOF or snapshots), or a policy that evicts keys.

Redis holds the ledger, the daily cap, the claims and the done-set. A restart of a Redis that keeps nothing
makes the next scan pay for everything again and restarts the daily cap from zero; an evicting policy can
drop a claim or a ledger entry under memory pressure. Workers and `scan` check at start and stop, naming what
to set, unless IRLIVE_ALLOW_VOLATILE_REDIS=true (demos and tests that mean it).

Behind Sentinel the check runs on the master the sentinels name and on every replica they list: a replica
is the next master, and one that keeps nothing on disk forgets everything at its first restart after a
failover.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from worker.errors import ConfigError, IrliveError
from worker.seams.store import Store

FIX = ("start Redis with `--appendonly yes` (or `appendonly yes` in redis.conf; `--save` snapshots lose the "
       "last minutes) and `--maxmemory-policy noeviction`, or set IRLIVE_ALLOW_VOLATILE_REDIS=true to accept "
       "paying again for what a restart forgets")


@dataclass(frozen=True)
class Durability:
    """What a Redis keeps across a restart, as far as CONFIG GET can tell."""

    checked: bool
    appendonly: bool = False
    snapshots: bool = False
    policy: str = ""
    why_unchecked: str = ""
    # What is wrong with the replicas (behind Sentinel), each naming its replica.
    replica_problems: tuple[str, ...] = ()

    @property
    def persistent(self) -> bool:
        return self.appendonly or self.snapshots

    @property
    def evicts(self) -> bool:
        return self.policy not in ("", "noeviction")

    def problems(self) -> list[str]:
        found = []
        if not self.persistent:
            found.append("it keeps nothing on disk (appendonly no, save \"\")")
        if self.evicts:
            found.append(f"its maxmemory-policy {self.policy} evicts keys under memory pressure")
        return found + list(self.replica_problems)

    def describe(self) -> str:
        if not self.checked:
            return f"durability not checked ({self.why_unchecked})"
        kept = "AOF" if self.appendonly else "snapshots only" if self.snapshots else "nothing on disk"
        return f"{kept}, maxmemory-policy {self.policy or '?'}"


def inspect(store: Store) -> Durability:
    """Read appendonly, save and maxmemory-policy; managed Redis that forbids CONFIG is reported unchecked."""
    try:
        config = store.config_get("appendonly")
        config.update(store.config_get("save"))
        config.update(store.config_get("maxmemory-policy"))
    except ConfigError:
        return Durability(False, why_unchecked="this Redis does not allow CONFIG GET")
    except IrliveError as exc:
        if "unreachable" in str(exc):
            raise
        return Durability(False, why_unchecked="this Redis does not allow CONFIG GET")
    if not config:
        return Durability(False, why_unchecked="CONFIG GET answered nothing (a managed Redis?)")
    return Durability(True, appendonly=config.get("appendonly") == "yes",
                      snapshots=bool(config.get("save", "").strip()), policy=config.get("maxmemory-policy", ""))


def inspect_replicas(store: Store) -> tuple[str, ...]:
    """The problems of each replica the sentinels list (none without Sentinel), each naming its replica."""
    problems: list[str] = []
    for replica in store.replicas():
        try:
            found = inspect(replica)
        except IrliveError:
            # A replica down right now is Sentinel's business (it is not promoted while down); checked next start.
            continue
        finally:
            replica.close()
        problems += [f"its replica {replica.where}: {p}" for p in (found.problems() if found.checked else [])]
    return tuple(problems)


def require_durable(store: Store, *, allow_volatile: bool, where: str) -> Durability:
    """ConfigError naming what to set when Redis would forget money, unless volatile Redis is allowed."""
    found = inspect(store)
    if found.checked:
        found = replace(found, replica_problems=inspect_replicas(store))
    problems = found.problems() if found.checked else []
    if problems and not allow_volatile:
        raise ConfigError(f"the Redis at {where} is not safe to keep money in: {'; '.join(problems)}. {FIX}")
    return found
