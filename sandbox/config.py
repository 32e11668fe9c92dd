"""The sandbox's settings: one dataclass, the range of each (KNOBS), its validated partial updates, and one CLI
flag per field."""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args, get_type_hints

SERVICE_ID = "infrared-face-liveness-detection"
# The legacy listing of the same tool: its own service id, so its own payments and tokens.
LEGACY_SERVICE_ID = "aliyun-facebody-detect-infrared-living-face"
SERVICE_IDS = (SERVICE_ID, LEGACY_SERVICE_ID)
# Which tool paths a deployment exposes: "both" listings, each selling its own service id; or "legacy": only
# the legacy path, selling the main service id (no payment can be bought for the legacy id there).
TOOL_PATH_MODES = ("both", "legacy")
# How a judged call's 200 answer is shaped: "normal", or one way a seller can answer badly (the token is
# settled before the upstream runs, so every one of them is billed like a real answer).
# How POST /api/payments answers once it has created (and charged) the payment: what a seller's purchase answer
# can look like when it is not the documented one.
PAYMENT_ANSWERS = (
    "normal",
    "renamed_token",  # 201, the token under a field name the buyer does not know (`tkn`)
    "empty",  # 201 with an empty body
    "nested",  # 201, a JSON body nested 100000 levels deep: json.loads raises RecursionError
    "server_error",  # 500 with a JSON error body
    "hang",  # no answer for timeout_sleep_s, then the normal one: the buyer's read times out first
)
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
MAX_API_KEY_CHARS = 200
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
    payment_answer: str = "normal"
    # A tool call sleeps this long after its token is consumed and before it downloads the images, so a test
    # can change an object between the worker's validation and the seller's fetch.
    fetch_delay_ms: int = 0
    # The next this-many tool calls find every image download refused (HTTP 503), as a seller fetching from an
    # overloaded store does: the whole call fails InvalidImage.Download. Counted down; setting it starts again.
    download_refusals: int = 0
    # The next this-many tool calls hang for timeout_sleep_s after settling, whatever p_timeout draws: a test of
    # the timeout path that must meet one. Counted down; setting it starts again.
    forced_timeouts: int = 0
    # x402: the chain (CAIP-2) and address the sandbox asks to be paid on, and how long a signature may live.
    x402_network: str = "eip155:8453"
    x402_pay_to: str = DEFAULT_PAY_TO
    x402_max_timeout_s: int = 60
    tool_paths: str = "both"


@dataclass(frozen=True)
class Knob:
    """What a setting means and which values it takes: one entry drives its `--help`, its command-line
    check and the check of a config update, so the three cannot disagree."""

    meaning: str
    # The values allowed, worded as `--help` and every refusal say it.
    allowed: str
    ok: Callable[[Any], bool] = lambda value: True
    # A refusal does not echo the value back: it may be a real key given by mistake.
    secret: bool = False


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _between(meaning: str, low: float, high: float) -> Knob:
    # A NaN compares false both ways, so it is refused like any other value outside the range.
    return Knob(meaning, f"{_number(low)} to {_number(high)}", lambda value: low <= value <= high)


def _one_of(meaning: str, choices: tuple[str, ...]) -> Knob:
    return Knob(meaning, f"one of {', '.join(choices)}", lambda value: value in choices)


def _matching(meaning: str, pattern: str, allowed: str, secret: bool = False) -> Knob:
    return Knob(meaning, allowed, lambda value: re.fullmatch(pattern, value) is not None, secret)


def _flag(meaning: str) -> Knob:
    # Being a real bool (checked before any range) is all a flag needs.
    return Knob(meaning, "true or false")


_VISIBLE = r"[ -~]"
KNOBS: dict[str, Knob] = {
    "price_cents": _between("price of one payment token (one judged call), in US cents", 1, 100_000),
    "rate_limit_per_s": _between("judged calls allowed per second; 0: no limit", 0, 10_000),
    "rate_burst": _between("judged calls allowed at once above the rate", 1, 10_000),
    "throttle_style": _one_of("how a throttled call is answered: 429 with Retry-After, or 400 Throttling.User",
                              ("429", "400")),
    "latency_ms": _between("every judged call sleeps this long after settling, in milliseconds", 0, MAX_SLEEP_MS),
    "p_5xx": _between("probability that a settled call answers 500 or 503 instead of judging", 0, 1),
    "p_timeout": _between("probability that a settled call hangs for timeout_sleep_s first", 0, 1),
    "timeout_sleep_s": _between("how long an injected timeout hangs, in seconds", 0, MAX_SLEEP_MS // 1000),
    "failed_calls_consume_token": _flag("whether a call that answers an error still spends its token"),
    "token_ttl_s": _between("how long a payment token stays valid, in seconds; 0 or less: born expired",
                            -86_400, 30 * 86_400),
    "bad_image_fails_call": _flag("whether one bad image fails its whole call (as upstream) or only its element"),
    "result_as_string": _flag("whether data.Result is a JSON string (as upstream) or an object"),
    "seed": _between("seed of the random draws behind p_5xx and p_timeout", 0, 2**32 - 1),
    # HTTP drops spaces around a header value, so a key starting or ending with one could never match.
    "api_key": _matching("API key every call must carry in api_key_header; unset: none asked for",
                         f"[!-~]({_VISIBLE}{{0,{MAX_API_KEY_CHARS - 2}}}[!-~])?",
                         f"1 to {MAX_API_KEY_CHARS} visible ASCII characters, inner spaces allowed", secret=True),
    "api_key_header": _matching("header that carries the API key", r"[A-Za-z0-9-]{1,100}",
                                "an HTTP header name: 1 to 100 letters, digits or hyphens"),
    "max_image_bytes": _between("largest image a call downloads, in bytes", 1, 2**30),
    "max_image_pixels": _between("largest width times height decoded, checked from the header, in pixels",
                                 1, 1_000_000_000),
    "fetch_timeout_s": _between("how long one image download may take, in seconds", 0.1, MAX_SLEEP_MS // 1000),
    "tool_paths": _one_of("tool paths exposed: both listings, or only the legacy path (selling the main "
                          "service id)", TOOL_PATH_MODES),
    "answer_mode": _one_of("shape of a judged call's 200 answer", ANSWER_MODES),
    "retry_after": _matching("Retry-After header value of every 429 throttle answer, sent verbatim (e.g. 1e400 "
                             "or an HTTP date); empty: the computed wait", f"{_VISIBLE}{{0,{MAX_RETRY_AFTER_CHARS}}}",
                             f"at most {MAX_RETRY_AFTER_CHARS} characters, visible ASCII or spaces"),
    "payment_latency_ms": _between("POST /api/payments sleeps this long before creating the payment, in "
                                   "milliseconds", 0, MAX_SLEEP_MS),
    "payment_answer": _one_of("how POST /api/payments answers after it has created (charged) the payment",
                              PAYMENT_ANSWERS),
    "fetch_delay_ms": _between("a tool call sleeps this long after consuming its token, before fetching the "
                               "images, in milliseconds", 0, MAX_SLEEP_MS),
    "download_refusals": _between("the next N tool calls find every image download refused (HTTP 503 from an "
                                  "overloaded store) and fail InvalidImage.Download", 0, 1_000_000),
    "forced_timeouts": _between("the next N tool calls hang for timeout_sleep_s after settling, whatever p_timeout "
                                "draws", 0, 1_000_000),
    "x402_network": _one_of("CAIP-2 network of the x402 offer", tuple(X402_NETWORKS)),
    "x402_pay_to": _matching("the sandbox's own x402 receiving address", r"0x[0-9a-fA-F]{40}",
                             "0x and 40 hex digits"),
    "x402_max_timeout_s": _between("maxTimeoutSeconds of the x402 offer: how long a signature may live, in "
                                   "seconds", 1, 86_400),
}


def problem(name: str, value: Any) -> str | None:
    """Why `value` is outside the range of setting `name`, or None when it is inside."""
    if value is None or KNOBS[name].ok(value):
        return None
    return refusal(name, value)


def refusal(name: str, value: Any, kinds: str = "") -> str:
    """'p_5xx must be 0 to 1, got 2.0': the one wording of every refusal, on the command line and over HTTP."""
    knob = KNOBS[name]
    allowed = f"{kinds} ({knob.allowed})" if kinds else knob.allowed
    return f"{name} must be {allowed}" + ("" if knob.secret else f", got {value!r}")


def _allowed(name: str) -> set[Any]:
    hint = get_type_hints(SandboxConfig)[name]
    return set(get_args(hint)) or {hint}


def _wrong_type(name: str, allowed: set[Any], value: Any) -> str:
    return refusal(name, value, " or ".join(sorted(getattr(kind, "__name__", str(kind)) for kind in allowed)))


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
                raise ValueError(_wrong_type(name, allowed, value))
            clean[name] = value
        elif float in allowed and isinstance(value, int | float):
            clean[name] = float(value)
        elif (int in allowed and isinstance(value, int)) or (str in allowed and isinstance(value, str)):
            clean[name] = value
        else:
            raise ValueError(_wrong_type(name, allowed, value))
    new = dataclasses.replace(config, **clean)
    for field in dataclasses.fields(SandboxConfig):
        reason = problem(field.name, getattr(new, field.name))
        if reason is not None:
            raise ValueError(reason)
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
    raise ValueError(text)


_FLAG_TYPES: tuple[tuple[type, Callable[[str], Any]], ...] = ((bool, _bool), (float, float), (int, int))


def _flag_type(name: str) -> Callable[[str], Any]:
    """The flag's parser: its type, then its range, refused in the words a config update is refused in."""
    allowed = _allowed(name)
    parse = next((parse for kind, parse in _FLAG_TYPES if kind in allowed), str)

    def checked(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(refusal(name, text)) from None
        reason = problem(name, value)
        if reason is not None:
            raise argparse.ArgumentTypeError(reason)
        return value

    return checked


def flag_help(name: str, default: Any) -> str:
    """`meaning (allowed); default: …` with argparse's % escaped, since help strings are %-formatted."""
    knob = KNOBS[name]
    return f"{knob.meaning} ({knob.allowed}); default: {default!r}".replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per SandboxConfig field, defaulting to the field's default."""
    for field in dataclasses.fields(SandboxConfig):
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=_flag_type(field.name),
            default=field.default,
            help=flag_help(field.name, field.default),
        )


def from_args(args: argparse.Namespace) -> SandboxConfig:
    """The config a parsed command line asks for; ValueError if a value is out of range."""
    names = {field.name for field in dataclasses.fields(SandboxConfig)}
    return updated(SandboxConfig(), {k: v for k, v in vars(args).items() if k in names})
