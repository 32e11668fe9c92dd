"""The sandbox's settings: one dataclass, its validated partial updates, and one CLI flag per field."""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, get_args, get_type_hints

SERVICE_ID = "infrared-face-liveness-detection"
# The legacy listing of the same tool: its own service id, so its own payments and tokens.
LEGACY_SERVICE_ID = "aliyun-facebody-detect-infrared-living-face"
SERVICE_IDS = (SERVICE_ID, LEGACY_SERVICE_ID)
# How a judged call's 200 answer is shaped: "normal", or one way a seller can answer badly (the token is
# settled before the upstream runs, so every one of them is billed like a real answer).
ANSWER_MODES = (
    "normal",
    "not_json",  # the body is not JSON at all
    "result_not_json",  # data.Result is a string cut off halfway: not JSON
    "fewer_elements",  # the last image's element is missing
    "more_elements",  # a second, contradicting element for the first image
    "unknown_url",  # every element names an ImageURL that was not in the call
    "missing_fields",  # every element keeps only its ImageURL: no FaceNumber, no Results
    "huge_body",  # a valid answer padded to about 50 MB
    # Hostile values: a reader that raises on them must still record the paid call, never pay for it again.
    "nested_json",  # data.Result is a JSON string nested 100000 levels deep: json.loads raises RecursionError
    "nan_rect",  # every face's Rect holds bare NaN and Infinity tokens, as Python's json.dumps writes them
    "huge_rect",  # every face's Rect Width and Height are the literal 1e999, which parses as inf
    "bad_image_url",  # every element's ImageURL is "http://[::1", on which urllib.parse.urlsplit raises
    "lone_surrogate",  # every face's MessageTips carries \udc80, the JSON escape of a lone surrogate
)
# Bounds of the millisecond sleeps: long enough for any test, short enough that a typo cannot hang a run.
MAX_SLEEP_MS = 600_000
# retry_after is sent verbatim as a header value: visible ASCII and spaces only (no CR/LF to split headers).
MAX_RETRY_AFTER_CHARS = 200
# The chains the sandbox sells x402 on: CAIP-2 id -> (v1 name, USDC contract, its EIP-712 domain name). The
# domain name is the token's own (Base Sepolia's USDC calls itself "USDC"), or signatures would not recover.
X402_NETWORKS: dict[str, tuple[str, str, str]] = {
    "eip155:8453": ("base", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin"),
    "eip155:84532": ("base-sepolia", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC"),
}
# The sandbox's own receiving address: fixed, so tests and a client's payTo allow-list can name it.
DEFAULT_PAY_TO = "0x000000000000000000000000000000000000402a"


@dataclass
class SandboxConfig:
    """Every behaviour of the sandbox that tests and benchmarks turn; each is also a CLI flag."""

    price_cents: int = 20
    rate_limit_per_s: float = 0.0
    rate_burst: int = 1
    throttle_style: str = "429"
    latency_ms: int = 0
    p_5xx: float = 0.0
    p_timeout: float = 0.0
    timeout_sleep_s: float = 30.0
    failed_calls_consume_token: bool = True
    token_ttl_s: float = 600.0
    bad_image_fails_call: bool = True
    result_as_string: bool = True
    seed: int = 0
    api_key: str | None = None
    api_key_header: str = "X-API-Key"
    max_image_bytes: int = 10 * 1024 * 1024
    # The sandbox's own guard against decompression bombs (a small file of huge dimensions), checked from the
    # header before any pixel is decoded; not a documented upstream limit.
    max_image_pixels: int = 4096 * 4096
    fetch_timeout_s: float = 5.0
    answer_mode: str = "normal"
    # When set, every 429 throttle answer carries exactly this Retry-After value (a huge number, an HTTP date,
    # garbage) instead of the computed wait: what the worker does with a hostile Retry-After.
    retry_after: str = ""
    # POST /api/payments sleeps this long before creating the payment: a slow purchase.
    payment_latency_ms: int = 0
    # A tool call sleeps this long after its token is consumed and before it downloads the images, so a test
    # can change an object between the worker's validation and the seller's fetch.
    fetch_delay_ms: int = 0
    # x402: the chain (CAIP-2) and address the sandbox asks to be paid on, and how long a signature may live.
    x402_network: str = "eip155:8453"
    x402_pay_to: str = DEFAULT_PAY_TO
    x402_max_timeout_s: int = 60


# Help text of the flags that need more than their default to be understood.
_HELP = {
    "answer_mode": f"shape of a judged call's 200 answer, one of {', '.join(ANSWER_MODES)}",
    "retry_after": "Retry-After header value of every 429 throttle answer, sent verbatim (visible ASCII, "
    f"at most {MAX_RETRY_AFTER_CHARS} characters, e.g. 1e400 or an HTTP date); empty: the computed wait",
    "payment_latency_ms": f"POST /api/payments sleeps this long before creating the payment (0 to {MAX_SLEEP_MS})",
    "x402_network": f"CAIP-2 network of the x402 offer, one of {', '.join(X402_NETWORKS)}",
    "x402_pay_to": "the sandbox's own x402 receiving address (0x and 40 hex digits)",
    "x402_max_timeout_s": "maxTimeoutSeconds of the x402 offer (1 to 86400)",
    "fetch_delay_ms": "a tool call sleeps this long after consuming its token, before fetching the images "
    f"(0 to {MAX_SLEEP_MS})",
}


def _allowed(name: str) -> set[Any]:
    hint = get_type_hints(SandboxConfig)[name]
    return set(get_args(hint)) or {hint}


def updated(config: SandboxConfig, changes: dict[str, Any]) -> SandboxConfig:
    """A copy of `config` with `changes` applied; ValueError names the first bad field."""
    names = {field.name for field in dataclasses.fields(SandboxConfig)}
    clean: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in names:
            raise ValueError(f"unknown sandbox setting {name!r}")
        allowed = _allowed(name)
        if value is None and type(None) in allowed:
            clean[name] = None
        elif isinstance(value, bool) or bool in allowed:
            # bool is an int to Python, but a flag given as 1 or a count given as true is a mistake.
            if not (isinstance(value, bool) and bool in allowed):
                raise ValueError(f"{name} must be a boolean")
            clean[name] = value
        elif float in allowed and isinstance(value, int | float):
            clean[name] = float(value)
        elif (int in allowed and isinstance(value, int)) or (str in allowed and isinstance(value, str)):
            clean[name] = value
        else:
            kinds = " or ".join(sorted(getattr(kind, "__name__", str(kind)) for kind in allowed))
            raise ValueError(f"{name} must be {kinds}")
    new = dataclasses.replace(config, **clean)
    if new.throttle_style not in ("429", "400"):
        raise ValueError("throttle_style must be '429' or '400'")
    if new.answer_mode not in ANSWER_MODES:
        raise ValueError(f"answer_mode must be one of {', '.join(ANSWER_MODES)}")
    if new.rate_burst < 1:
        raise ValueError("rate_burst must be at least 1")
    if new.max_image_pixels < 1:
        raise ValueError("max_image_pixels must be at least 1")
    for name in ("payment_latency_ms", "fetch_delay_ms"):
        if not 0 <= getattr(new, name) <= MAX_SLEEP_MS:
            raise ValueError(f"{name} must be 0 to {MAX_SLEEP_MS}")
    if new.x402_network not in X402_NETWORKS:
        raise ValueError(f"x402_network must be one of {', '.join(X402_NETWORKS)}")
    if not re.fullmatch(r"0x[0-9a-fA-F]{40}", new.x402_pay_to):
        raise ValueError("x402_pay_to must be 0x and 40 hex digits")
    if not 1 <= new.x402_max_timeout_s <= 86_400:
        raise ValueError("x402_max_timeout_s must be 1 to 86400")
    if len(new.retry_after) > MAX_RETRY_AFTER_CHARS or not all(" " <= c <= "~" for c in new.retry_after):
        raise ValueError(f"retry_after must be at most {MAX_RETRY_AFTER_CHARS} visible ASCII characters or spaces")
    return new


def public_config(config: SandboxConfig) -> dict[str, Any]:
    """The settings as JSON, with the API key masked: whoever set it knows it."""
    doc = dataclasses.asdict(config)
    if doc["api_key"] is not None:
        doc["api_key"] = "***"
    return doc


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_FLAG_TYPES: tuple[tuple[type, Any], ...] = ((bool, _bool), (float, float), (int, int))


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per SandboxConfig field, defaulting to the field's default."""
    for field in dataclasses.fields(SandboxConfig):
        allowed = _allowed(field.name)
        kind: Any = next((parse for t, parse in _FLAG_TYPES if t in allowed), str)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=kind,
            default=field.default,
            help=f"{_HELP[field.name]}; default: {field.default!r}" if field.name in _HELP
            else f"default: {field.default}",
        )


def from_args(args: argparse.Namespace) -> SandboxConfig:
    """The config a parsed command line asks for; ValueError if a value is out of range."""
    names = {field.name for field in dataclasses.fields(SandboxConfig)}
    return updated(SandboxConfig(), {k: v for k, v in vars(args).items() if k in names})
