"""Spending caps in integer cents: per run (charged when a token is lent) and per UTC day (money paid out).

The caps are checked inside the scripts that commit money (buy_begin, buy_end, take); this module holds the
settings, the day's name, and the messages that say which cap stopped what.
"""

from __future__ import annotations

from datetime import UTC, datetime

from worker.errors import BudgetExhausted
from worker.keys import Keys
from worker.seams.store import Store


class Budgets:
    """The run caps live in the run record (`budget_cents`); the daily cap is a setting."""

    def __init__(self, store: Store, keys: Keys, daily_cap_cents: int | None) -> None:
        self._store = store
        self._keys = keys
        self.daily_cap_cents = daily_cap_cents

    @property
    def day_cap_arg(self) -> int:
        return -1 if self.daily_cap_cents is None else self.daily_cap_cents

    def run_exhausted(self, run_id: str) -> BudgetExhausted:
        cap = int(self._store.hget(self._keys.run(run_id), "budget_cents") or 0)
        return BudgetExhausted(f"run budget of ${cap / 100:.2f} reached; raise it with "
                               f"`irlive resume {run_id} --budget USD`")

    def day_exhausted(self, day: str) -> BudgetExhausted:
        cap = self.day_cap_arg
        return BudgetExhausted(f"daily budget of ${cap / 100:.2f} (IRLIVE_DAILY_BUDGET_USD) reached for {day}")

    def bought_on(self, day: str) -> int:
        return int(self._store.hget(self._keys.day(day), "bought_cents") or 0)

    def spent_today(self) -> int:
        return self.bought_on(today())


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")
