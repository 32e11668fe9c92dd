"""The token ledger on a real Redis with a scripted marketplace (httpx.MockTransport): every money path."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from sandbox.stack import Stack
from worker.errors import BudgetExhausted, OutcomeUnknown, PaymentNeverPaid
from worker.flow.leases import Lease
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.money.budgets import Budgets
from worker.money.ledger import Ledger, Token
from worker.seams.marketplace import Marketplace
from worker.seams.store import Store

pytestmark = pytest.mark.integration
Handler = Callable[[httpx.Request], httpx.Response]


class Seller:
    """A scripted marketplace: payments and their states, answering like the real one."""

    def __init__(self) -> None:
        self.payments: dict[str, dict[str, object]] = {}
        self.statuses: list[str] = []  # what successive GETs of a payment answer, then "paid"
        self.create_fails: Exception | None = None

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/api/tools/"):
            return httpx.Response(402, json={"priceCents": 20, "serviceId": "svc"})
        if path == "/api/payments" and request.method == "POST":
            if self.create_fails:
                raise self.create_fails
            pid = f"p{len(self.payments) + 1}"
            self.payments[pid] = {"paymentId": pid, "token": f"tok-{pid}", "amountCents": 20,
                                  "status": "pending" if self.statuses else "paid", "remainingCalls": 1}
            return httpx.Response(201, json=self.payments[pid])
        pid = path.rsplit("/", 1)[-1]
        doc = dict(self.payments[pid])
        if self.statuses:
            doc["status"] = self.statuses.pop(0)
        doc.pop("token")
        return httpx.Response(200, json=doc)


Env = tuple[Ledger, Seller, redis.Redis, Runs]
HOLDER = "test/1/holder"


@pytest.fixture
def env(clean_stack: Stack) -> Iterator[Env]:
    client = redis.Redis.from_url(clean_stack.redis_url, decode_responses=True)
    store = Store(client)
    seller = Seller()
    market = Marketplace("http://seller", "svc", transport=httpx.MockTransport(seller.handle))
    keys = Keys()
    ledger = Ledger(store, keys, market, Budgets(store, keys, daily_cap_cents=100), max_price_cents=20,
                    lease_s=0.2)
    runs = Runs(store, keys)
    runs.create("r", source="s3://in/x", output="s3://out/y", settings={}, budget_cents=60)
    yield ledger, seller, client, runs
    market.close()


def chunk_lease(client: redis.Redis, holder: str = HOLDER) -> str:
    """Take the chunk lease a token is sent under; returns its key."""
    lease = Lease(Store(client), Keys().chunk_lease("r", 0), 60, token=holder)
    assert lease.take()
    return lease.key


def send(ledger: Ledger, client: redis.Redis, token: Token, images: list[str]) -> None:
    """Mark the token sent and leave it so, as a worker killed mid-call would."""
    with ledger.spend(token, images, chunk_lease(client, token.holder), "r 0"):
        pass


def test_a_pending_payment_is_polled_until_paid_never_bought_twice(env: Env,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ledger, seller, _, _ = env
    monkeypatch.setattr("worker.money.purchaser.PENDING_POLL_S", 0.0)
    seller.statuses = ["pending", "pending", "paid"]
    token = ledger.take("r", HOLDER)
    assert token.payment_id == "p1" and len(seller.payments) == 1


def test_a_payment_that_expires_while_pending_is_void(env: Env,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ledger, seller, client, _ = env
    monkeypatch.setattr("worker.money.purchaser.PENDING_POLL_S", 0.0)
    seller.statuses = ["pending", "expired"]
    # Not transient: money moved (a payment was created); the outcome table voids the token, then retries.
    with pytest.raises(PaymentNeverPaid):
        ledger.take("r", HOLDER)
    assert client.hget("irlive:pay:p1", "state") == "void"


def test_a_purchase_whose_answer_was_lost_is_counted_and_not_repeated(
        env: Env) -> None:
    ledger, seller, client, _runs = env
    seller.create_fails = httpx.ReadTimeout("lost")
    with pytest.raises(OutcomeUnknown):
        ledger.take("r", HOLDER)
    assert ledger.totals()["unknown_purchases"] == 1
    assert ledger.totals()["spent_today_cents"] == 20, "it may have been paid: the day cap counts it"
    assert client.hget("irlive:run:r", "committed_cents") == "20", "and the run's cap, though no call came of it"
    assert client.hget("irlive:run:r", "unknown_purchases") == "1"


def test_the_run_budget_stops_the_fourth_call_of_a_60_cent_budget(
        env: Env) -> None:
    ledger, _, _, _ = env
    tokens = [ledger.take("r", HOLDER) for _ in range(3)]
    with pytest.raises(BudgetExhausted, match=r"run budget of \$0\.60"):
        ledger.take("r", HOLDER)
    ledger.give_back(tokens[0])
    assert ledger.take("r", HOLDER).payment_id == tokens[0].payment_id, "a returned token gives its budget back"


def test_the_daily_cap_counts_purchases_for_the_pool_too(env: Env) -> None:
    ledger, _, _, _ = env
    assert ledger.refill(5) == 5
    with pytest.raises(BudgetExhausted, match="daily budget"):
        ledger.refill(6)


def test_settling_twice_charges_once(env: Env) -> None:
    ledger, _, client, _runs = env
    token = ledger.take("r", HOLDER)
    with ledger.spend(token, ["in/x/a.png@e"], chunk_lease(client), "r 0") as spend:
        spend.answered("req-1", b"{}")
    assert not ledger.settle(token.payment_id, "spent", lost=True), "a late reconciliation changes nothing"
    assert (client.hget("irlive:run:r", "calls"), client.hget("irlive:run:r", "spend_cents")) == ("1", "20")
    assert client.hget("irlive:run:r", "answers_lost") is None


def test_a_settlement_or_a_recorded_call_told_another_run_charges_the_payments_own(env: Env) -> None:
    # The run comes from the caller (no round trip reads it first); the scripts check it against the payment's.
    ledger, _, client, runs = env
    runs.create("other", source="s3://in/x", output="s3://out/y", settings={}, budget_cents=60)
    other = client.hgetall("irlive:run:other")
    token = ledger.take("r", HOLDER)
    with ledger.spend(token, ["in/x/a.png@e"], chunk_lease(client), "r 0") as spend:
        assert ledger.settle(token.payment_id, "spent", request_id="req-1", answer="{}", chunk_ref="r 0",
                             run_id="other") == 1
        spend.settled = True
    assert (client.hget("irlive:run:r", "calls"), client.hget("irlive:run:r", "spend_cents")) == ("1", "20")
    assert client.sismember("irlive:run:r:payments", token.payment_id)
    assert not ledger.recorded(token.payment_id, failed=False, run_id="other")
    assert (client.hget("irlive:run:r", "calls_ended"), client.hget("irlive:run:r", "calls_in_flight")) == ("1", "0")
    assert client.hgetall("irlive:run:other") == other and client.keys("irlive:run:other*") == ["irlive:run:other"]


def test_a_dead_workers_tokens_come_back_after_the_lease(env: Env) -> None:
    ledger, _seller, client, _ = env
    reserved = ledger.take("r", HOLDER)
    sent = ledger.take("r", HOLDER)
    send(ledger, client, sent, ["in/x/b.png@e"])  # then the worker dies; the seller never saw the call
    assert client.hget("irlive:run:r", "committed_cents") == "40"

    assert ledger.sweep() == 0, "live leases are left alone"
    swept = 0
    deadline = time.monotonic() + 5
    while swept < 2 and time.monotonic() < deadline:  # until the 0.2 s leases run out
        swept += ledger.sweep()
    assert swept == 2
    assert client.hget(f"irlive:pay:{reserved.payment_id}", "state") == "paid"
    assert client.hget(f"irlive:pay:{sent.payment_id}", "state") == "paid", "reconciled: remainingCalls was 1"
    assert client.llen(ledger.pool_key) == 2
    assert client.hget("irlive:run:r", "committed_cents") == "0"


def test_a_token_waits_for_the_listing_it_was_bought_for(env: Env) -> None:
    """Switching IRLIVE_SERVICE_ID (or the tool path) leaves the other listing's pooled tokens alone, unspent
    and not voided, and they are spent again once that listing is back (issue 22, item 11)."""
    ledger_a, seller, client, _runs = env
    assert ledger_a.refill(2) == 2
    market_b = Marketplace("http://seller", "svc-b", transport=httpx.MockTransport(seller.handle))
    store = Store(client)
    keys = Keys()
    ledger_b = Ledger(store, keys, market_b, Budgets(store, keys, daily_cap_cents=100), max_price_cents=20,
                      lease_s=0.2)
    try:
        assert ledger_b.pool_key != ledger_a.pool_key
        token_b = ledger_b.take("r", HOLDER)
        assert len(seller.payments) == 3, "listing b bought its own token"
        assert client.llen(ledger_a.pool_key) == 2, "listing a's tokens were not taken"
        assert client.hget(f"irlive:pay:{token_b.payment_id}", "listing") == "svc-b /api/tools/svc-b"
        assert ledger_b.other_pools() == {"svc /api/tools/svc": 2}
        assert ledger_b.totals()["pool_other_listings"] == 2
        # Back under listing a: its pooled tokens are spent, nothing more is bought.
        token_a = ledger_a.take("r", HOLDER)
        assert len(seller.payments) == 3 and client.llen(ledger_a.pool_key) == 1
        # A sweep by b of a's lapsed lease puts a's token back into a's pool, not b's.
        deadline = time.monotonic() + 5
        while client.zscore("irlive:wallet:leases", token_a.payment_id) is not None and time.monotonic() < deadline:
            ledger_b.sweep()
        assert client.llen(ledger_a.pool_key) == 2 and client.llen(ledger_b.pool_key) <= 1
    finally:
        market_b.close()


def test_a_kept_answer_names_its_images_even_when_their_keys_hold_commas(env: Env) -> None:
    ledger, _, client, _runs = env
    token = ledger.take("r", HOLDER)
    images = ["in/x/a,b.png@e1", "in/x/100%2C.png@e2", "in/x/c.png@e3"]
    with ledger.spend(token, images, chunk_lease(client), "r 0") as spend:
        spend.answered("req-1", b"{}")
    # What the chunk's next delivery replays (a worker killed before recording): the very images it sent.
    [kept] = ledger.unrecorded("r", 0)
    assert kept.identities == images
    # payments.jsonl keeps them escaped: one comma between images (settle.lua counts images by commas).
    assert [p["images"] for p in ledger.settled_payments("r")] == ["in/x/a%2Cb.png@e1,in/x/100%252C.png@e2,"
                                                                     "in/x/c.png@e3"]
