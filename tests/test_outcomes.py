"""The outcome table against the error tree: every class has its row, nothing raised after money may have moved
is transient, and the one backoff keeps its bounds."""

from __future__ import annotations

import importlib
import pkgutil
import random

import pytest

import producer
import worker
from worker.backoff import Backoff
from worker.errors import IrliveError, MoneyMoved, TransientError, UnreadableAnswer
from worker.outcomes import TABLE, Action, outcome

# Actions that settle money that may have moved; only the MoneyMoved branch may lead to them.
_MONEY_ACTIONS = {Action.RECONCILE, Action.VOID_AND_RETRY, Action.RECORD_PAID}


def _every_error_class() -> set[type[IrliveError]]:
    for package in (worker, producer):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module.name.endswith("__main__"):  # that one runs the CLI
                importlib.import_module(module.name)
    found: set[type[IrliveError]] = set()
    todo: list[type[IrliveError]] = [IrliveError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_error_class_of_worker_errors_has_its_own_row() -> None:
    import worker.errors as tree

    declared = {c for c in vars(tree).values() if isinstance(c, type) and issubclass(c, IrliveError)} - {IrliveError}
    missing = sorted(c.__name__ for c in declared if c not in TABLE)
    assert not missing, f"error classes without a row in worker/outcomes.py: {missing}"
    assert all(row.why for row in TABLE.values())


def test_nothing_raised_after_money_may_have_moved_is_transient() -> None:
    classes = _every_error_class()
    paid = {c for c in classes if issubclass(c, MoneyMoved)}
    assert paid, "the MoneyMoved branch exists"
    assert not {c.__name__ for c in paid if issubclass(c, TransientError)}
    # Every class (subclasses defined elsewhere included) takes its action from the table, and only the paid
    # branch is settled as money that may have moved.
    for cls in classes:
        action = next(TABLE[k].action for k in cls.__mro__ if k in TABLE)
        assert (action in _MONEY_ACTIONS) == issubclass(cls, MoneyMoved), cls.__name__


def test_a_garbage_2xx_answer_to_a_paid_call_is_recorded_not_paid_again() -> None:
    row = outcome(UnreadableAnswer("the answer could not be read (RecursionError)", b"[[["))
    assert row.action is Action.RECORD_PAID and "cannot be read" in row.why


def test_an_exception_that_is_not_ours_is_retried_as_a_bug() -> None:
    assert outcome(KeyError("x")).action is Action.RETRY


@pytest.mark.parametrize("retry", range(12))
def test_backoff_is_full_jitter_under_the_cap(retry: int) -> None:
    backoff = Backoff(base_s=0.5, cap_s=20.0)
    ceiling = min(20.0, 0.5 * 2 ** retry)
    rng = random.Random(retry)
    draws = [backoff.delay(retry, rng.random()) for _ in range(200)]
    assert all(0 <= d <= ceiling for d in draws) and max(draws) > ceiling / 2
    assert Backoff(base_s=0.5, cap_s=20.0, jitter=False).delay(retry) == ceiling
    assert backoff.delay(retry, 0.0) == 0.0 and backoff.delay(10**6, 0.5) == 10.0
