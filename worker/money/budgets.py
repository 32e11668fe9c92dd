"""Spending caps in integer cents: per run (calls charged to it) and per day (money paid out), checked atomically."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from worker.errors import BudgetExhausted
from worker.keys import Keys

# Commit `price` cents against a cap, or refuse. KEYS[1] hash, ARGV: field of the committed amount, field of
# the cap ('' = no cap field), price, fixed cap (-1 = none). Returns 1 when committed.
_COMMIT = """
local committed = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local cap = tonumber(ARGV[4])
if ARGV[2] ~= '' then
  local stored = redis.call('HGET', KEYS[1], ARGV[2])
  if stored and stored ~= '' then cap = tonumber(stored) end
end
local price = tonumber(ARGV[3])
if cap >= 0 and committed + price > cap then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], price)
return 1
"""


class Budget:
    """Run caps live in the run record (`budget_cents`); the daily cap is a setting, spent per UTC day."""

    def __init__(self, redis: Any, keys: Keys, daily_cap_cents: int | None) -> None:
        self._redis = redis
        self._keys = keys
        self._daily_cap = daily_cap_cents
        self._commit = redis.register_script(_COMMIT)

    def commit_run(self, run_id: str, cents: int) -> None:
        """Charge one call's price to the run before its token is taken; BudgetExhausted if it would cross."""
        ok = self._commit(keys=[self._keys.run(run_id)], args=["committed_cents", "budget_cents", cents, -1])
        if not int(ok):
            raise self.run_exhausted(run_id)

    def run_exhausted(self, run_id: str) -> BudgetExhausted:
        cap = int(self._redis.hget(self._keys.run(run_id), "budget_cents") or 0)
        return BudgetExhausted(f"run budget of ${cap / 100:.2f} reached; raise it with "
                               f"`irlive resume {run_id} --budget USD`")

    def release_run(self, run_id: str, cents: int) -> None:
        """Give back a commitment whose token turned out not to be spent."""
        self._redis.hincrby(self._keys.run(run_id), "committed_cents", -cents)

    def commit_day(self, cents: int) -> None:
        """Charge a purchase to today's cap before it is made."""
        cap = -1 if self._daily_cap is None else self._daily_cap
        ok = self._commit(keys=[self._keys.day(today())], args=["bought_cents", "", cents, cap])
        if not int(ok):
            raise BudgetExhausted(f"daily budget of ${cap / 100:.2f} (IRLIVE_DAILY_BUDGET_USD) reached for {today()}")

    def release_day(self, cents: int, day: str | None = None) -> None:
        """A purchase that certainly did not happen."""
        self._redis.hincrby(self._keys.day(day or today()), "bought_cents", -cents)

    def spent_today(self) -> int:
        return int(self._redis.hget(self._keys.day(today()), "bought_cents") or 0)


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")
