"""x402 money semantics on the real stack (Redis, moto_server, the sandbox over HTTP): what a signature costs when
the seller settles, fails, or answers too late, with irlive's ledger equal to the sandbox's settlements."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from sandbox.images import png
from sandbox.stack import AWS_ENV, Stack
from tests.e2e import IN_BUCKET, X402_ENV, X402_KEY, X402_SECRET
from worker.config import Settings
from worker.errors import OutcomeUnknown, SignatureRefused, TransientError
from worker.flow.leases import ChunkLease
from worker.flow.pipeline import Deps
from worker.flow.states import RunState
from worker.judge.manifest import Item
from worker.money.ledger import Spend
from worker.ops.runtime import build_deps
from worker.seams.marketplace import CallAnswer

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stack's fake AWS credentials, for the clients built in this process."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)

PRICE_UNITS = 20 * 10_000


@dataclass
class Call:
    """One paid call made the way the pipeline makes it, and what the ledger and the sandbox hold after it."""

    deps: Deps
    run_id: str
    payment_id: str


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def x402_deps(stack: Stack, **env: str) -> Deps:
    return build_deps(Settings.from_env({**stack.env, **X402_ENV, **env}))


def image_url(stack: Stack, deps: Deps, key: str = "x402/live.png") -> tuple[str, str]:
    """A capture uploaded to moto, presigned for the sandbox to fetch; (url, identity)."""
    put = stack.s3_client().put_object(Bucket=IN_BUCKET, Key=key, Body=png(128, 128, "live", seed=3))
    identity = Item(IN_BUCKET, key, put["ETag"].strip('"')).identity
    return deps.storage.presign_get(IN_BUCKET, key, deps.settings.presign_ttl), identity


@contextmanager
def one_call(stack: Stack, deps: Deps, run_id: str = "x402-run") -> Iterator[tuple[Spend, str]]:
    """A run with a budget of one call, a token (a payment id) lent to it and marked sent; yields (spend, url)."""
    deps.runs.create(run_id, source="test", output="", settings={}, budget_cents=20)
    deps.runs.move(run_id, RunState.RUNNING)
    url, identity = image_url(stack, deps)
    with ChunkLease(deps.store, deps.runs.keys, run_id, 0) as lease:
        token = deps.ledger.take(run_id, lease.token)
        with deps.ledger.spend(token, [identity], lease.key, f"{run_id} 0") as spend:
            yield spend, url


def record(stack: Stack, payment_id: str) -> dict[str, str]:
    r = stack.redis_client()
    return {_text(k): _text(v) for k, v in r.hgetall(f"irlive:pay:{payment_id}").items()}


def run_money(stack: Stack, run_id: str) -> tuple[int, int, int]:
    """(committed_cents, spend_cents, calls) of the run."""
    run = {_text(k): _text(v) for k, v in stack.redis_client().hgetall(f"irlive:run:{run_id}").items()}
    return int(run.get("committed_cents") or 0), int(run.get("spend_cents") or 0), int(run.get("calls") or 0)


def day_bought(stack: Stack) -> int:
    r = stack.redis_client()
    return sum(int(r.hget(key, "bought_cents") or 0) for key in r.scan_iter("irlive:day:*"))


def test_a_settled_call_writes_the_seller_s_settlement_to_the_ledger(clean_stack: Stack) -> None:
    deps = x402_deps(clean_stack)
    with one_call(clean_stack, deps) as (spend, url):
        answer = deps.method.call(spend.token.secret, [url])
        spend.answered(answer.request_id, answer.raw, bought=True)
    assert isinstance(answer, CallAnswer)
    ledger = clean_stack.sandbox_ledger()
    [settlement] = ledger["x402_settlements"]
    mine = record(clean_stack, spend.token.payment_id)
    assert mine["state"] == "spent" and mine["x402_outcome"] == "settled"
    assert mine["x402_transaction"] == settlement["transaction"] and mine["x402_payer"] == settlement["payer"]
    assert int(mine["x402_amount"]) == int(settlement["amount"]) == PRICE_UNITS
    assert mine["x402_nonce"].startswith("0x") and len(mine["x402_nonce"]) == 66
    assert ledger["payments_created"] == 0 and ledger["calls_billed"] == 1
    assert run_money(clean_stack, "x402-run") == (20, 20, 1) and day_bought(clean_stack) == 20
    assert X402_SECRET.search(json.dumps(mine)) is None, "no signature or key on the ledger record"


def test_a_5xx_without_a_settlement_charges_nothing(clean_stack: Stack) -> None:
    clean_stack.sandbox_config(p_5xx=1.0)
    deps = x402_deps(clean_stack)
    with one_call(clean_stack, deps) as (spend, url):
        with pytest.raises(TransientError) as info:
            deps.method.call(spend.token.secret, [url])
        assert spend.failed() is False, "not spent: the commitment is released"
    ledger = clean_stack.sandbox_ledger()
    assert ledger["x402_unsettled"] == 1 and ledger["x402_settled"] == 0 and ledger["calls_billed"] == 0
    assert record(clean_stack, spend.token.payment_id)["state"] == "unsettled"
    assert run_money(clean_stack, "x402-run") == (0, 0, 0) and day_bought(clean_stack) == 0
    assert deps.ledger.totals()["unsettled"] == 1 and deps.ledger.totals()["in_flight"] == 0
    assert X402_SECRET.search(str(info.value)) is None


def test_a_refused_signature_is_not_settled_and_the_retry_signs_anew(clean_stack: Stack) -> None:
    """A 402 for the signature (the seller's offer changed: another receiving address) settles nothing; the
    next call reads the offer again and pays the new address."""
    deps = x402_deps(clean_stack)
    with one_call(clean_stack, deps) as (spend, url):
        clean_stack.sandbox_config(x402_pay_to="0x" + "77" * 20)
        with pytest.raises(SignatureRefused):
            deps.method.call(spend.token.secret, [url])
        assert spend.failed() is False
    assert clean_stack.sandbox_ledger()["x402_settled"] == 0
    assert run_money(clean_stack, "x402-run") == (0, 0, 0) and day_bought(clean_stack) == 0
    with one_call(clean_stack, deps, "x402-run-2") as (spend, url):
        answer = deps.method.call(spend.token.secret, [url])
        spend.answered(answer.request_id, answer.raw, bought=True)
    [settlement] = clean_stack.sandbox_ledger()["x402_settlements"]
    assert record(clean_stack, spend.token.payment_id)["x402_transaction"] == settlement["transaction"]


@pytest.mark.slow
def test_a_timeout_after_the_seller_settled_is_answered_again_under_the_same_identifier(clean_stack: Stack) -> None:
    """The answer is late (the sandbox hangs 3 s, the worker waits 1 s): the same signed payment, same payment
    identifier, is sent again until the seller answers it with the settled answer; one charge, no answer lost."""
    clean_stack.sandbox_config(p_timeout=1.0, timeout_sleep_s=3)
    deps = x402_deps(clean_stack, IRLIVE_CALL_TIMEOUT_S="1")
    with one_call(clean_stack, deps) as (spend, url):
        answer = deps.method.call(spend.token.secret, [url])
        spend.answered(answer.request_id, answer.raw, bought=True)
    ledger = clean_stack.sandbox_ledger()
    assert ledger["timeouts"] == 1 and ledger["x402_settled"] == ledger["calls_billed"] == 1
    assert ledger["x402_refused"] >= 1, "sent again while the first was still served (its nonce held)"
    [settlement] = ledger["x402_settlements"]
    mine = record(clean_stack, spend.token.payment_id)
    assert mine["state"] == "spent" and mine["x402_transaction"] == settlement["transaction"]
    assert mine.get("lost") == "0"
    assert run_money(clean_stack, "x402-run") == (20, 20, 1) and day_bought(clean_stack) == 20


@pytest.mark.slow
def test_an_unknown_outcome_settled_while_the_answer_was_lost_is_found_by_its_identifier(clean_stack: Stack) -> None:
    """The call leaves, its connection drops, the sandbox settles it; nobody sends it again (its worker died).
    Once its signature expired, reconciliation asks the seller under the same identifier: paid (409), so it is
    spent with its answer lost; never signed again under a fresh identifier."""
    clean_stack.sandbox_config(x402_max_timeout_s=4, latency_ms=1000)
    deps = x402_deps(clean_stack)
    short = x402_deps(clean_stack, IRLIVE_CALL_TIMEOUT_S="0.3")
    with one_call(clean_stack, deps) as (spend, url):
        payer: Any = short.method
        offer = payer.offer()
        signed = payer.signer.sign(offer, spend.token.payment_id)
        payer._note(spend.token.payment_id, x402_valid_before=signed.valid_before)
        with pytest.raises(OutcomeUnknown):
            short.market.post_tool({"Tasks": [{"ImageURL": url}]}, {signed.header: signed.value})
        poll(lambda: clean_stack.sandbox_ledger()["x402_settled"] == 1, 10, "the sandbox to settle")
        with pytest.raises(TransientError):
            deps.ledger.seller.get_payment(spend.token.payment_id)  # still valid: cannot be told yet
        poll(lambda: time.time() > signed.valid_before + 3.5, 10, "the signature to expire")
        assert spend.unknown() is True
    mine = record(clean_stack, spend.token.payment_id)
    assert mine["state"] == "spent" and mine["lost"] == "1" and mine["x402_reconciled"] == "identifier"
    ledger = clean_stack.sandbox_ledger()
    assert ledger["x402_settled"] == ledger["calls_billed"] == 1, "the probe itself settled nothing"
    assert run_money(clean_stack, "x402-run") == (20, 20, 1) and day_bought(clean_stack) == 20


@pytest.mark.slow
def test_an_unknown_outcome_the_seller_never_settled_is_released(clean_stack: Stack) -> None:
    """The seller hangs past the signature's validBefore, so it cannot settle it (a chain would refuse): the
    call gives up sending it again when it expires, asks by identifier, and releases the commitment."""
    clean_stack.sandbox_config(x402_max_timeout_s=5, p_timeout=1.0, timeout_sleep_s=8)
    deps = x402_deps(clean_stack, IRLIVE_CALL_TIMEOUT_S="1")
    with one_call(clean_stack, deps) as (spend, url):
        with pytest.raises(OutcomeUnknown):
            deps.method.call(spend.token.secret, [url])
        assert spend.unknown() is False
    assert record(clean_stack, spend.token.payment_id)["state"] == "unsettled"
    poll(lambda: clean_stack.sandbox_ledger()["x402_unsettled"] >= 1, 15, "the sandbox to give the call up")
    ledger = clean_stack.sandbox_ledger()
    assert ledger["x402_settled"] == ledger["calls_billed"] == 0
    assert run_money(clean_stack, "x402-run") == (0, 0, 0) and day_bought(clean_stack) == 0


def test_the_key_from_a_file_signs_and_appears_nowhere(clean_stack: Stack, tmp_path: Any) -> None:
    key_file = tmp_path / "payer.key"
    key_file.write_text(X402_KEY + "\n")
    deps = build_deps(Settings.from_env({**clean_stack.env, "IRLIVE_PAYMENT_METHOD": "x402",
                                         "IRLIVE_X402_KEY_FILE": str(key_file)}))
    with one_call(clean_stack, deps) as (spend, url):
        answer = deps.method.call(spend.token.secret, [url])
        spend.answered(answer.request_id, answer.raw, bought=True)
    [settlement] = clean_stack.sandbox_ledger()["x402_settlements"]
    payer: Any = deps.method
    assert settlement["payer"] == payer.signer.address
    assert X402_KEY[2:] not in repr(deps.settings) + repr(payer.signer.__dict__) + json.dumps(
        deps.settings.public_view())


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def test_a_payment_id_never_signed_goes_back_to_nobody_and_costs_nothing(clean_stack: Stack) -> None:
    """A worker that died holding a committed payment id (reserved, or sent but killed before signing): the
    sweep releases it (no pool for x402: nothing is pre-signed stock); the run and the day get their cents back."""
    deps = x402_deps(clean_stack)
    deps.runs.create("x402-run", source="test", output="", settings={}, budget_cents=40)
    deps.runs.move("x402-run", RunState.RUNNING)
    _, identity = image_url(clean_stack, deps)
    with ChunkLease(deps.store, deps.runs.keys, "x402-run", 0) as lease:
        reserved = deps.ledger.take("x402-run", lease.token)
        sent = deps.ledger.take("x402-run", lease.token)
        with deps.ledger.spend(sent, [identity], lease.key, "x402-run 0"):
            pass  # killed before the signature was made
    assert run_money(clean_stack, "x402-run")[0] == 40 and day_bought(clean_stack) == 40
    assert deps.ledger.sweep(everything=True) == 2
    for token in (reserved, sent):
        assert record(clean_stack, token.payment_id)["state"] == "unsettled"
    assert run_money(clean_stack, "x402-run") == (0, 0, 0) and day_bought(clean_stack) == 0
    assert deps.ledger.totals()["pool"] == 0 and clean_stack.sandbox_ledger()["x402_refused"] == 0
