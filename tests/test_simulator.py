"""The fault simulator of the money core (tests/simulator.py): CI's share of seeds holds every invariant, and
each money fix of the issue that asked for the simulator, reverted, is found within those seeds."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests import simulator
from tests.simulator import Report, private_redis, run_seed
from worker.flow.pipeline import ChunkProcessor
from worker.money.purchaser import Purchaser
from worker.seams import store as store_module

pytestmark = pytest.mark.slow

# CI's share of seeds (about a minute here); `python -m tests.simulator --seeds 100000` runs the long mode.
CI_SEEDS = int(os.environ.get("IRLIVE_SIM_SEEDS", "300"))


@pytest.fixture(scope="module")
def sim_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    with private_redis(tmp_path_factory.mktemp("simulator")) as client:
        yield client


@pytest.fixture
def quiet() -> Iterator[None]:
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


def _first_violation(client: redis.Redis, seeds: int, wanted: str) -> tuple[int, Report] | None:
    """The first seed with a violation naming `wanted`."""
    for seed in range(seeds):
        report = run_seed(seed, client)
        if any(wanted in v for v in report.violations):
            return seed, report
    return None


def test_ci_seeds_hold_every_invariant(sim_redis: redis.Redis, quiet: None) -> None:
    reports = [run_seed(seed, sim_redis) for seed in range(CI_SEEDS)]
    bad = [r for r in reports if r.violations]
    crashes = sum(r.crashes for r in reports)
    faults = sum(len(r.faults) for r in reports)
    print(f"{len(reports)} seeds: {faults} fault kinds switched on, {crashes} workers killed, "
          f"{sum(r.calls for r in reports)} paid calls, {sum(r.unknown_purchases for r in reports)} unknown "
          f"purchases, {sum(r.answers_lost for r in reports)} answers lost")
    assert crashes > 0 and faults > len(reports), "the seeds injected faults and killed workers"
    assert not bad, "\n".join(f"{r.line()}: {r.violations}\n  replay: IRLIVE_SIM_SEED={r.seed} "
                              ".venv/bin/pytest tests/test_simulator.py -k replay -s" for r in bad)


@pytest.mark.skipif("IRLIVE_SIM_SEED" not in os.environ, reason="replays one seed: IRLIVE_SIM_SEED=<seed>")
def test_replay(tmp_path: Path) -> None:
    seed = int(os.environ["IRLIVE_SIM_SEED"])
    logging.basicConfig(level=logging.INFO)
    with private_redis(tmp_path) as client:
        report = run_seed(seed, client)
    print(report.line())
    assert not report.violations, report.violations


def _lua(name: str, old: str, new: str) -> Callable[[str, str], str]:
    """script_source with one script's text changed (a fix reverted)."""
    original = store_module.script_source

    def source(package: str, script: str) -> str:
        text = original(package, script)
        if f"{package}/{script}" == name:
            assert old in text, f"{name} no longer holds {old!r}"
            text = text.replace(old, new)
        return text
    return source


# Each fix of the money issue, reverted, and the invariant that must catch it within CI's seeds.
REVERTS: dict[str, tuple[str, Callable[[pytest.MonkeyPatch], None]]] = {
    # 1. A purchase answered without a usable token written down as never made.
    "unreadable purchase settled failed": ("seller charged", lambda mp: mp.setattr(
        Purchaser, "_settle_unknown",
        lambda self, request_id, run_id, what, payment_id: self._settle_request(request_id, "failed"))),
    # 2. A purchase whose outcome is unknown gives its commitment back to the run.
    "unknown purchase not charged to the run": ("the runs were allowed", lambda mp: mp.setattr(
        store_module, "script_source", _lua(
        "money/buy_failed", "if run == '' then return 1 end",
        "if run ~= '' then redis.call('HINCRBY', KEYS[4], 'committed_cents', -price) end\n"
        "if run == '' then return 1 end"))),
    # 3. A purchase begun but not confirmed by the store (a short WAIT) left open for the sweep.
    "unconfirmed purchase left open": ("never reached the seller", lambda mp: mp.setattr(
        Purchaser, "_settle_quietly", lambda self, request_id, to: None)),
    # Records written without validating again (a stopped run's rest, a replayed answer) without the content keys
    # the chunk's validations kept: a content claim pinned to a partial paid answer stays pinned for an hour,
    # and with one claim per image it holds the image itself.
    "stopped chunk's records without content keys": ("never completed", lambda mp: mp.setattr(
        ChunkProcessor, "_restore_contents", lambda self, chunk: None)),
    # The double payment the overlap fault trial found: claims of an unrecorded answer lapse with the lease.
    "claims of a paid answer not pinned": ("usable answers delivered", lambda mp: mp.setattr(
        store_module, "script_source", _lua(
            "money/settle", "local function pin_claims()\n", "local function pin_claims()\n  do return end\n"))),
}


@pytest.mark.parametrize("revert", list(REVERTS))
def test_the_simulator_finds_each_money_fix_reverted(sim_redis: redis.Redis, quiet: None,
                                                      monkeypatch: pytest.MonkeyPatch, revert: str) -> None:
    wanted, apply = REVERTS[revert]
    apply(monkeypatch)
    found = _first_violation(sim_redis, CI_SEEDS, wanted)
    assert found is not None, f"{revert}: no violation naming {wanted!r} in {CI_SEEDS} seeds"
    seed, report = found
    print(f"{revert}: found by seed {seed} ({seed + 1} seeds): "
          f"{next(v for v in report.violations if wanted in v)}")


def test_the_long_mode_command_runs_seeds_in_processes_and_says_what_it_saw(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert simulator.main(["--seeds", "6", "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("6 seeds in ") and "0 seeds with violations" in out
