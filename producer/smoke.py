"""`irlive smoke`: exactly one paid call on one image, through the ledger and its caps, printing what the seller did."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from worker.config import S3Location, Settings
from worker.errors import IrliveError, OutcomeUnknown, PaymentRejected
from worker.flow.leases import ChunkLease
from worker.flow.states import RunState
from worker.flow.validate import Limits, validate
from worker.judge.manifest import Item
from worker.judge.verdicts import judge_answer
from worker.ops.runtime import build_deps


def smoke(settings: Settings, image: S3Location) -> dict[str, Any]:
    """Answers the open questions of docs: price, token field, Result shape, verdict, whether the token is spent.

    The purchase goes through the ledger like any other: it is written down, charged to the day's cap, and
    recorded as a one-call run `smoke-<time>` whose budget is one call at the allowed price.
    """
    deps = build_deps(settings)
    limits = Limits(settings.max_image_bytes, settings.min_image_side, settings.max_image_side)
    info, fmt = validate(deps.storage, image.bucket, image.prefix, limits)
    report: dict[str, Any] = {"image": str(image), "size": info.size, "format": fmt.format}
    try:
        quote = deps.ledger.seller.quote()
        report["quote_cents"] = quote.price_cents
        if quote.price_cents > settings.max_price_cents:
            report["stopped"] = f"price {quote.price_cents} above IRLIVE_MAX_PRICE_CENTS {settings.max_price_cents}"
            return report
        run_id = "smoke-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        deps.runs.create(run_id, source=str(image), output="", settings=settings.producer_view(),
                         budget_cents=settings.max_price_cents)
        report["run_id"] = run_id
        try:
            _call(deps, run_id, image, info.etag, report)
        finally:
            deps.runs.move(run_id, RunState.RUNNING)
            deps.runs.move(run_id, RunState.DONE)
    finally:
        deps.market.close()
    return report


def _call(deps: Any, run_id: str, image: S3Location, etag: str, report: dict[str, Any]) -> None:
    settings = deps.settings
    identity = Item(image.bucket, image.prefix, etag).identity
    with ChunkLease(deps.store, deps.runs.keys, run_id, 0) as lease:
        token = deps.ledger.take(run_id, lease.token)
        payment = deps.ledger.seller.get_payment(token.payment_id)
        record = deps.store.hgetall(deps.runs.keys.payment(token.payment_id))
        report["payment"] = {"id": payment.payment_id, "amount_cents": payment.amount_cents,
                             "status": payment.status, "remaining_calls": payment.remaining_calls,
                             "expires_at": payment.expires_at, "token_present": bool(token.secret),
                             "token_field": record.get("token_field") or None}
        url = deps.storage.presign_get(image.bucket, image.prefix, settings.presign_ttl)
        with deps.ledger.spend(token, [identity], lease.key, f"{run_id} 0") as spend:
            try:
                answer = deps.method.call(token.secret, [url])
            except PaymentRejected as exc:
                spend.refused(str(exc)[:200])
                report["call_error"] = f"{type(exc).__name__}: {exc}"
                return
            except OutcomeUnknown as exc:
                spend.unknown()
                report["call_error"] = f"{type(exc).__name__}: {exc}"
                return
            except IrliveError as exc:
                spend.failed()
                report["call_error"] = f"{type(exc).__name__}: {exc}"
                return
            spend.answered(answer.request_id, answer.raw)
        report["answer"] = {"request_id": answer.request_id,
                            "result_type": "string" if isinstance(answer.result, str) else "object"}
        (judgement,) = judge_answer([url], answer.result)
        verdict = getattr(judgement, "verdict", None)
        deps.ledger.recorded(token.payment_id, failed=verdict is None)
        report["verdict"] = verdict or f"unusable: {judgement}"
    after = deps.ledger.seller.get_payment(token.payment_id)
    report["payment_after"] = {"status": after.status, "remaining_calls": after.remaining_calls}
    if settings.payment_method == "x402":
        # What the seller's PAYMENT-RESPONSE said, as the ledger keeps it (public: no signature, no key).
        kept = deps.store.hgetall(deps.runs.keys.payment(token.payment_id))
        report["x402"] = {k.removeprefix("x402_"): v for k, v in kept.items() if k.startswith("x402_")}


def render(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
