"""Every sandbox knob has one range, said in `--help` and enforced alike on the command line and over HTTP."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.config import KNOBS, SandboxConfig, public_config, updated
from sandbox.server import PORT_RANGE, SandboxServer, main

ROOT = Path(__file__).resolve().parent.parent
FIELDS = [field.name for field in dataclasses.fields(SandboxConfig)]

# Values outside each knob's range, each as JSON sends it; the command line gets the same value as text.
BAD: dict[str, tuple[Any, ...]] = {
    "price_cents": (0, -5, 100_001),
    "rate_limit_per_s": (-1, -0.5, 10_001),
    "rate_burst": (0, -1, 10_001),
    "throttle_style": ("503", ""),
    "latency_ms": (-1, 600_001),
    "p_5xx": (2, -0.1, 1.01),
    "p_timeout": (1.5, -1),
    "timeout_sleep_s": (-1, 601),
    "failed_calls_consume_token": ("maybe",),
    "token_ttl_s": (-86_401, 1e9),
    "bad_image_fails_call": ("sometimes",),
    "result_as_string": ("perhaps",),
    "seed": (-1, 2**32),
    "api_key": ("", "a\nb", "k" * 201, " k", "k "),
    "api_key_header": ("X:Y", "", "Bad Header"),
    "max_image_bytes": (0, -1, 2**30 + 1),
    "max_image_pixels": (0, -1),
    "fetch_timeout_s": (0, -1, 601),
    "answer_mode": ("sometimes", "NORMAL"),
    "payment_answer": ("lost", "EMPTY"),
    "tool_paths": ("legacy-only", "LEGACY"),
    "retry_after": ("a\tb", "9" * 201, "é"),
    "payment_latency_ms": (-1, 600_001),
    "fetch_delay_ms": (-1, 600_001),
    "download_refusals": (-1, 1_000_001),
    "forced_timeouts": (-1, 1_000_001),
    "x402_network": ("eip155:1", "base"),
    "x402_pay_to": ("0x123", "0x" + "g" * 40),
    "x402_max_timeout_s": (0, 86_401),
}
CASES = [pytest.param(name, value, id=f"{name}={value!r:.20}") for name, values in BAD.items() for value in values]

# The edges of each range, accepted.
GOOD: dict[str, tuple[Any, ...]] = {
    "price_cents": (1, 100_000),
    "rate_limit_per_s": (0, 10_000),
    "rate_burst": (1, 10_000),
    "throttle_style": ("429", "400"),
    "latency_ms": (0, 600_000),
    "p_5xx": (0, 1),
    "p_timeout": (0, 1),
    "timeout_sleep_s": (0, 600),
    "token_ttl_s": (-86_400, 30 * 86_400),
    "seed": (0, 2**32 - 1),
    "api_key": (None, "k", "k" * 200, "two words"),
    "api_key_header": ("Authorization", "X-API-Key"),
    "max_image_bytes": (1, 2**30),
    "max_image_pixels": (1, 1_000_000_000),
    "fetch_timeout_s": (0.1, 600),
    "retry_after": ("", "9" * 200, "Wed, 21 Oct 2015 07:28:00 GMT"),
    "payment_latency_ms": (0, 600_000),
    "fetch_delay_ms": (0, 600_000),
    "download_refusals": (0, 1_000_000),
    "forced_timeouts": (0, 1_000_000),
    "x402_max_timeout_s": (1, 86_400),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_knob_has_a_range_and_bad_values_to_try() -> None:
    assert set(KNOBS) == set(FIELDS)
    assert set(BAD) == set(FIELDS)


@pytest.mark.parametrize(("name", "value"), CASES)
def test_the_command_line_refuses_a_value_out_of_range(
    name: str, value: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([f"{_flag(name)}={value}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {_flag(name)}: {name} must be" in err and KNOBS[name].allowed in err, err


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig()) as server:
        yield server


@pytest.mark.parametrize(("name", "value"), CASES)
def test_a_config_update_refuses_a_value_out_of_range(sandbox: SandboxServer, name: str, value: Any) -> None:
    before = httpx.get(sandbox.url + "/_sandbox/config").json()
    valid = {"seed": 7} if name != "seed" else {"latency_ms": 7}
    refused = httpx.post(sandbox.url + "/_sandbox/config", json={**valid, name: value})
    assert refused.status_code == 400
    reason = refused.json()["error"]
    assert reason.startswith(f"{name} must be") and KNOBS[name].allowed in reason, reason
    # Refused whole: the valid change sent with it is not applied either.
    assert httpx.get(sandbox.url + "/_sandbox/config").json() == before


def test_a_refused_api_key_is_not_echoed_back() -> None:
    with pytest.raises(ValueError) as refused:
        updated(SandboxConfig(), {"api_key": "sk-live-secret\n"})
    assert "sk-live-secret" not in str(refused.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_numbers_that_are_not_finite_are_refused(value: float) -> None:
    for name in ("p_5xx", "rate_limit_per_s", "timeout_sleep_s", "token_ttl_s", "fetch_timeout_s"):
        with pytest.raises(ValueError, match=name):
            updated(SandboxConfig(), {name: value})


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in GOOD.items() for v in values])
def test_the_edges_of_each_range_are_accepted(name: str, value: Any) -> None:
    assert getattr(updated(SandboxConfig(), {name: value}), name) == value


def test_public_config_of_a_default_sandbox_is_inside_every_range() -> None:
    assert updated(SandboxConfig(), public_config(SandboxConfig())) == SandboxConfig()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=30)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--p-5xx", "2"), "argument --p-5xx: p_5xx must be 0 to 1, got 2.0"),
        (("--latency-ms", "-1"), "argument --latency-ms: latency_ms must be 0 to 600000, got -1"),
        (("--answer-mode", "sometimes"), "argument --answer-mode: answer_mode must be one of normal,"),
        (("--port", "-1"), f"argument --port: port must be {PORT_RANGE}, got '-1'"),
        (("--port", "65536"), f"argument --port: port must be {PORT_RANGE}, got '65536'"),
    ],
)
def test_python_m_sandbox_exits_2_naming_the_flag_and_its_range(args: tuple[str, ...], says: str) -> None:
    done = _run(*args)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert "sandbox listening" not in done.stdout


def _flag_helps(text: str) -> dict[str, str]:
    """Each `--flag`'s help text in `--help`, its wrapped lines joined."""
    helps: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            if current == "-h":
                current = "--help"
            helps[current] = " ".join(stripped.split()[2:])
        elif current is not None and stripped:
            helps[current] += " " + stripped
    return helps


def test_help_names_every_knob_with_its_meaning_and_range() -> None:
    shown = _run("--help")
    assert shown.returncode == 0
    helps = _flag_helps(shown.stdout)
    for name in FIELDS:
        text = " ".join(helps[_flag(name)].split())
        # Wrapping may break a line at a hyphen inside a word: compare without the spaces it leaves.
        squeezed = text.replace("- ", "-")
        assert f"({KNOBS[name].allowed})" in squeezed and "default:" in text, (name, text)
        assert KNOBS[name].meaning.replace("- ", "-") in squeezed, (name, text)
    assert f"({PORT_RANGE})" in helps["--port"] and helps["--host"]
