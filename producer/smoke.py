"""`irlive smoke`: exactly one paid call on one image, printing what the marketplace really did."""

from __future__ import annotations

import json
from typing import Any

from worker.config import S3Location, Settings
from worker.errors import IrliveError
from worker.flow.validate import Limits, validate
from worker.judge.verdicts import judge_answer
from worker.seams.marketplace import Marketplace
from worker.seams.storage import Storage


def smoke(settings: Settings, image: S3Location) -> dict[str, Any]:
    """Answers the open questions of docs: price, token field, Result shape, verdict, whether the token is spent."""
    storage = Storage(settings.s3_endpoint_url, settings.s3_region)
    limits = Limits(settings.max_image_bytes, settings.min_image_side, settings.max_image_side)
    info, fmt = validate(storage, image.bucket, image.prefix, limits)
    market = Marketplace(settings.marketplace_url, settings.service_id, api_key=settings.api_key,
                         api_key_header=settings.api_key_header, timeout_s=settings.call_timeout_s)
    report: dict[str, Any] = {"image": str(image), "size": info.size, "format": fmt.format}
    try:
        quote = market.quote()
        report["quote_cents"] = quote.price_cents
        if quote.price_cents > settings.max_price_cents:
            report["stopped"] = f"price {quote.price_cents} above IRLIVE_MAX_PRICE_CENTS {settings.max_price_cents}"
            return report
        payment = market.create_payment()
        report["payment"] = {"id": payment.payment_id, "amount_cents": payment.amount_cents,
                             "status": payment.status, "remaining_calls": payment.remaining_calls,
                             "expires_at": payment.expires_at, "token_present": payment.token is not None}
        if payment.token is None:
            report["stopped"] = "the payment answer carried no token under 'token' or 'paymentToken'"
            return report
        url = storage.presign_get(image.bucket, image.prefix, settings.presign_ttl)
        try:
            answer = market.call(payment.token, [url])
            report["answer"] = {"request_id": answer.request_id,
                                "result_type": "string" if isinstance(answer.result, str) else "object"}
            (judgement,) = judge_answer([url], answer.result)
            report["verdict"] = getattr(judgement, "verdict", None) or f"unusable: {judgement}"
        except IrliveError as exc:
            report["call_error"] = f"{type(exc).__name__}: {exc}"
        after = market.get_payment(payment.payment_id)
        report["payment_after"] = {"status": after.status, "remaining_calls": after.remaining_calls}
    finally:
        market.close()
    return report


def render(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
