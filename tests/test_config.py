"""worker.config: Settings from IRLIVE_* variables, range checks, and the secret-free public view."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from worker.config import S3Location, Settings
from worker.errors import ConfigError

ALL_VARS = {
    "IRLIVE_REDIS_URL": "redis://redis.internal:6380/2",
    "IRLIVE_S3_ENDPOINT_URL": "http://127.0.0.1:5000/",
    "IRLIVE_S3_REGION": "eu-west-1",
    "IRLIVE_OUTPUT": "s3://out-bucket/results/nightly/",
    "IRLIVE_MARKETPLACE_URL": "https://market.example.com",
    "IRLIVE_SERVICE_ID": "aliyun-facebody-detect-infrared-living-face",
    "IRLIVE_TOOL_PATH": "/marketplace/v2/tools/{service_id}/invoke",
    "IRLIVE_PAYMENT_METHOD": "MCP-Token",
    "IRLIVE_API_KEY": " sk_live_abc ",
    "IRLIVE_API_KEY_HEADER": "Authorization",
    "IRLIVE_IMAGES_PER_CALL": "7",
    "IRLIVE_CHUNK_SIZE": "200",
    "IRLIVE_PRESIGN_TTL": "600",
    "IRLIVE_MAX_PRICE_CENTS": "25",
    "IRLIVE_MAX_UNKNOWN_PURCHASES": "4",
    "IRLIVE_RATE_LIMIT_PER_S": "4.5",
    "IRLIVE_RATE_BURST": "3",
    "IRLIVE_MAX_ATTEMPTS": "8",
    "IRLIVE_CALL_TIMEOUT_S": "12.5",
    "IRLIVE_MAX_IMAGE_BYTES": "5000000",
    "IRLIVE_MIN_IMAGE_SIDE": "128",
    "IRLIVE_MAX_IMAGE_SIDE": "8000",
    "IRLIVE_VISIBILITY_TIMEOUT_S": "7200",
    "IRLIVE_METRICS_PORT": "9900",
    "IRLIVE_KEY_PREFIX": "irlive-test",
    "IRLIVE_DAILY_BUDGET_USD": "12.5",
    "IRLIVE_TOKEN_POOL_SIZE": "5",
    "IRLIVE_TOKEN_POOL_LOW": "2",
    "IRLIVE_MAX_DELIVERIES": "4",
    "IRLIVE_MAX_IN_FLIGHT": "8",
    "IRLIVE_RATE_ADAPTIVE": "false",
    "IRLIVE_ALLOW_VOLATILE_REDIS": "yes",
    "IRLIVE_MAX_RETRY_AFTER_S": "60",
    "IRLIVE_SQS_ENDPOINT_URL": "http://127.0.0.1:5001",
    "IRLIVE_EVENT_MAX_WAIT_S": "2.5",
    "IRLIVE_EVENT_RUN_WINDOW": "10m",
    "IRLIVE_EVENT_BUCKETS": "cams-eu, cams-us",
    "IRLIVE_SINCE_OVERLAP_S": "30m",
    "IRLIVE_LIST_WORKERS": "4",
    "IRLIVE_NOTIFY_URL": "https://hooks.example.com/services/T0/B0/secretpath",
    "IRLIVE_NOTIFY_SECRET": "whsec-not-in-any-view",
    "IRLIVE_MAX_ERROR_RATE": "0.25",
    "IRLIVE_MIN_CALLS": "40",
    "IRLIVE_LOG_FORMAT": "json",
    "IRLIVE_REVIEW_LIVE_BELOW": "65.5",
    "IRLIVE_X402_PRIVATE_KEY": " 0x" + "ab" * 32 + " ",
    "IRLIVE_X402_KEY_FILE": "/run/secrets/x402.key",
    "IRLIVE_X402_NETWORK": "eip155:84532",
    "IRLIVE_X402_ASSETS": "USDC, 0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    "IRLIVE_X402_PAY_TO": "0x000000000000000000000000000000000000402a",
}


def test_defaults_when_no_variable_is_set() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.service_id == "infrared-face-liveness-detection"
    assert (s.images_per_call, s.chunk_size, s.max_price_cents) == (10, 50, 20)
    assert s.output is None and s.api_key is None


def test_empty_variables_count_as_unset() -> None:
    assert Settings.from_env({"IRLIVE_CHUNK_SIZE": "", "IRLIVE_API_KEY": ""}) == Settings()


def test_unrelated_variables_are_ignored() -> None:
    assert Settings.from_env({"PATH": "/bin", "IRLIVE": "x", "REDIS_URL": "nonsense"}) == Settings()


def test_every_irlive_variable_is_parsed() -> None:
    s = Settings.from_env(ALL_VARS)
    assert s == Settings(
        redis_url="redis://redis.internal:6380/2",
        s3_endpoint_url="http://127.0.0.1:5000",
        s3_region="eu-west-1",
        output=S3Location("out-bucket", "results/nightly"),
        marketplace_url="https://market.example.com",
        service_id="aliyun-facebody-detect-infrared-living-face",
        tool_path="/marketplace/v2/tools/{service_id}/invoke",
        payment_method="mcp-token",
        api_key="sk_live_abc",
        api_key_header="Authorization",
        images_per_call=7,
        chunk_size=200,
        presign_ttl=600,
        max_price_cents=25,
        max_unknown_purchases=4,
        rate_limit_per_s=4.5,
        rate_burst=3,
        max_attempts=8,
        call_timeout_s=12.5,
        max_image_bytes=5_000_000,
        min_image_side=128,
        max_image_side=8000,
        visibility_timeout_s=7200,
        metrics_port=9900,
        key_prefix="irlive-test",
        daily_budget_usd=12.5,
        token_pool_size=5,
        token_pool_low=2,
        max_deliveries=4,
        max_in_flight=8,
        rate_adaptive=False,
        allow_volatile_redis=True,
        max_retry_after_s=60.0,
        sqs_endpoint_url="http://127.0.0.1:5001",
        event_max_wait_s=2.5,
        event_run_window=600,
        event_buckets=("cams-eu", "cams-us"),
        since_overlap_s=1800,
        list_workers=4,
        notify_url="https://hooks.example.com/services/T0/B0/secretpath",
        notify_secret="whsec-not-in-any-view",
        max_error_rate=0.25,
        min_calls=40,
        log_format="json",
        review_live_below=65.5,
        x402_private_key="0x" + "ab" * 32,
        x402_key_file="/run/secrets/x402.key",
        x402_network="eip155:84532",
        x402_assets=("USDC", "0x036CbD53842c5426634e7929541eC2318f3dCF7e"),
        x402_pay_to="0x000000000000000000000000000000000000402a",
    )


def test_views_hide_the_notify_secret_and_the_webhook_path() -> None:
    view = json.dumps(Settings.from_env(ALL_VARS).public_view())
    assert "whsec-not-in-any-view" not in view and "secretpath" not in view
    assert "hooks.example.com" in view


def test_the_variable_list_covers_every_settings_field() -> None:
    assert set(ALL_VARS) == {"IRLIVE_" + f.name.upper() for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("IRLIVE_IMAGES_PER_CALL", "11"),
        ("IRLIVE_IMAGES_PER_CALL", "0"),
        ("IRLIVE_IMAGES_PER_CALL", "abc"),
        ("IRLIVE_CHUNK_SIZE", "1.5"),
        ("IRLIVE_RATE_LIMIT_PER_S", "nan"),
        ("IRLIVE_RATE_LIMIT_PER_S", "inf"),
        ("IRLIVE_CALL_TIMEOUT_S", "soon"),
        ("IRLIVE_MAX_IMAGE_BYTES", "20000000"),
        ("IRLIVE_OUTPUT", "bucket"),
        ("IRLIVE_OUTPUT", "s3://ab/prefix"),
        ("IRLIVE_REDIS_URL", "nonsense"),
        ("IRLIVE_MARKETPLACE_URL", "market.example.com"),
        ("IRLIVE_DAILY_BUDGET_USD", "-1"),
        ("IRLIVE_X402_NETWORK", "base"),
        ("IRLIVE_X402_PAY_TO", "0x402a"),
        ("IRLIVE_X402_ASSETS", " , "),
        ("IRLIVE_PAYMENT_METHOD", "card"),
        ("IRLIVE_TOOL_PATH", "api/tools/x"),
        ("IRLIVE_TOOL_PATH", "/api/tools/x?key=1"),
        ("IRLIVE_TOOL_PATH", "/api/tools/{service_id}/{service_id}"),
        ("IRLIVE_TOOL_PATH", "/api/tools/{service}"),
        ("IRLIVE_TOOL_PATH", "https://market.example.com/api/tools/x"),
        ("IRLIVE_TOOL_PATH", "/api/tools/a b"),
    ],
)
def test_bad_value_raises_config_error_naming_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)


def test_the_tool_path_is_the_listing_s_by_default_and_may_name_another() -> None:
    assert Settings().tool_endpoint == "/api/tools/infrared-face-liveness-detection"
    legacy = Settings.from_env({"IRLIVE_TOOL_PATH": "/api/tools/aliyun-facebody-detect-infrared-living-face"})
    # Payments are still bought for the listing's own id: only the call's path changes.
    assert legacy.service_id == "infrared-face-liveness-detection"
    assert legacy.tool_endpoint == "/api/tools/aliyun-facebody-detect-infrared-living-face"
    assert Settings.from_env(ALL_VARS).tool_endpoint == \
        "/marketplace/v2/tools/aliyun-facebody-detect-infrared-living-face/invoke"


def test_public_view_hides_the_api_key() -> None:
    view = Settings.from_env(ALL_VARS).public_view()
    assert view["api_key"] == "***"
    assert "sk_live_abc" not in repr(view)
    assert view["output"] == "s3://out-bucket/results/nightly"
    assert set(view) == {f.name for f in dataclasses.fields(Settings)}
    assert Settings().public_view()["api_key"] is None


def test_require_output_names_the_variable_when_unset() -> None:
    with pytest.raises(ConfigError, match="IRLIVE_OUTPUT"):
        Settings().require_output()
    assert Settings.from_env({"IRLIVE_OUTPUT": "s3://out-bucket"}).require_output() == S3Location("out-bucket", "")


def test_s3_location_keys_join_without_empty_parts() -> None:
    assert S3Location("out-bucket", "results").key("runs", "r1") == "results/runs/r1"
    assert S3Location("out-bucket", "").key("runs", "r1") == "runs/r1"


def test_settings_repr_hides_the_api_key() -> None:
    assert "sk_live_abc" not in repr(Settings.from_env(ALL_VARS))


def test_an_api_key_an_http_header_cannot_carry_is_refused_without_printing_it() -> None:
    with pytest.raises(ConfigError, match="IRLIVE_API_KEY") as caught:
        Settings.from_env({"IRLIVE_API_KEY": "sk-live-\u200bsecretvalue"})
    assert "secretvalue" not in str(caught.value)


@pytest.mark.parametrize("url", ["redis://localhost:notaport/0", "redis://host:6379/abc", "http://redis:6379",
                                 "redis://", "unix://"])
def test_a_bad_redis_url_names_the_setting(url: str) -> None:
    with pytest.raises(ConfigError, match="IRLIVE_REDIS_URL"):
        Settings.from_env({"IRLIVE_REDIS_URL": url})


def test_a_redis_url_password_is_never_shown() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"IRLIVE_REDIS_URL": "redis://user:hunter2@host:6379/x"})
    assert "hunter2" not in str(caught.value)
    view = Settings.from_env({"IRLIVE_REDIS_URL": "redis://user:hunter2@host:6379/0"}).public_view()
    assert "hunter2" not in str(view)


# Every setting whose field holds a number (int or float, optional or not); bool is not one.
NUMERIC = sorted(f.name for f in dataclasses.fields(Settings)
                 if {"int", "float"} & set(str(f.type).replace("|", " ").split()))


def test_the_numeric_settings_are_found() -> None:
    assert {"event_run_window", "since_overlap_s", "daily_budget_usd", "call_timeout_s", "chunk_size"} <= set(NUMERIC)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e400", "-1e400", "1e400s", "infh", "9" * 5000, "0x10",
                                   "1_0e999"])
@pytest.mark.parametrize("name", NUMERIC)
def test_a_number_no_setting_can_hold_is_a_config_error_naming_it(name: str, value: str) -> None:
    var = "IRLIVE_" + name.upper()
    with pytest.raises(ConfigError, match=var):
        Settings.from_env({var: value})


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(NUMERIC), value=st.text(max_size=30) | st.floats().map(repr)
       | st.integers().map(str) | st.sampled_from(["inf", "nan", "1e400", "1e308", "1e-400", "-0", " 7 "]))
def test_every_numeric_setting_reads_any_text_as_a_value_or_a_config_error(name: str, value: str) -> None:
    """The fuzz behind `IRLIVE_EVENT_RUN_WINDOW=inf` (OverflowError): nothing but ConfigError escapes."""
    assume(value.strip() != "" and "\x00" not in value)
    var = "IRLIVE_" + name.upper()
    try:
        s = Settings.from_env({var: value})
    except ConfigError as exc:
        assert "IRLIVE_" in str(exc)  # this variable, or the one it is checked against (MIN/MAX_IMAGE_SIDE)
    else:
        held = getattr(s, name)
        assert held is None or math.isfinite(held), f"{var}={value!r} was read as {held!r}"


X402_KEY = "0x" + "5d" * 32


def test_x402_needs_exactly_one_key_source_and_never_prints_a_bad_key() -> None:
    with pytest.raises(ConfigError, match="IRLIVE_X402_KEY_FILE"):
        Settings.from_env({"IRLIVE_PAYMENT_METHOD": "x402"})
    with pytest.raises(ConfigError, match="both set"):
        Settings.from_env({"IRLIVE_PAYMENT_METHOD": "x402", "IRLIVE_X402_PRIVATE_KEY": X402_KEY,
                           "IRLIVE_X402_KEY_FILE": "/k"})
    near_miss = X402_KEY[:-1] + "z"
    with pytest.raises(ConfigError, match="IRLIVE_X402_PRIVATE_KEY") as info:
        Settings.from_env({"IRLIVE_PAYMENT_METHOD": "x402", "IRLIVE_X402_PRIVATE_KEY": near_miss})
    assert near_miss[2:20] not in str(info.value)
    assert Settings.from_env({"IRLIVE_PAYMENT_METHOD": "x402", "IRLIVE_X402_KEY_FILE": "/k"}).x402_key_file == "/k"


def test_x402_keeps_no_pool_and_its_key_out_of_every_view() -> None:
    s = Settings.from_env({"IRLIVE_PAYMENT_METHOD": "x402", "IRLIVE_X402_PRIVATE_KEY": X402_KEY,
                           "IRLIVE_TOKEN_POOL_SIZE": "5"})
    assert s.pool_size == 0 and s.enforced_view()["token_pool_size"] == 0
    assert Settings(token_pool_size=5).pool_size == 5
    for view in (s.public_view(), s.producer_view(), s.enforced_view()):
        assert X402_KEY[2:] not in json.dumps(view)
    assert s.public_view()["x402_private_key"] == "***"
    assert X402_KEY[2:] not in repr(s)
