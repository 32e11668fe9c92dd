"""A Redis password never shows, whatever it holds: masking works from the parsed URL, over generated credentials,
through every place a URL setting is shown or stored (`irlive config`, the run hash and manifest, config errors)."""

from __future__ import annotations

import json
import os
import subprocess
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from tests.conftest import IRLIVE_BIN
from worker.config import Settings
from worker.errors import ConfigError
from worker.ops.redact import mask_url

# Any printable ASCII and a few non-ASCII letters, the URL delimiters included: a password is what a user typed.
PASSWORDS = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("äß€ \t"),
                    min_size=6, max_size=24)
USERS = st.sampled_from(["", "irlive-app", "u"])
FORMS = st.sampled_from([
    "redis://{u}:{p}@cache.internal:6379/0",
    "rediss://{u}:{p}@cache.internal:6380/2",
    "redis://{u}:{p}@cache.internal",
    "sentinel://{u}:{p}@s1:26379,s2:26379/mymaster/0",
    "unix:///run/redis.sock?db=0&password={p}",
    "redis://cache:6379/0?password={p}&health_check_interval=30",
])


def _url(form: str, user: str, password: str) -> str:
    return form.format(u=user, p=password)


def _carried(form: str, user: str, password: str) -> bool:
    """In a query, the password is what a parser reads back (`password=a&b=c` carries "a"); in the userinfo, all
    of it is the user's password, however badly it is encoded."""
    if "{p}@" in form:
        return True
    url = _url(form, user, password)
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True)).get("password") == password


def _visible(password: str, shown: str, form: str, user: str) -> bool:
    # A password that is also a piece of the URL's own text (a host name, "6379") cannot be told apart.
    return password in shown and password not in _url(form, user, "")


@settings(max_examples=400, deadline=None)
@given(password=PASSWORDS, user=USERS, form=FORMS)
@example(password="p w s3cret", user="", form="rediss://{u}:{p}@cache.internal:6380/2")
@example(password="a/b s3cret", user="", form="redis://{u}:{p}@cache.internal:6379/0")
@example(password="s3cret@x y", user="", form="unix:///run/redis.sock?db=0&password={p}")
# `;` is no query separator to redis-py (parse_qs): it is all one password (found by this test, December 7).
@example(password=";0000=", user="", form="unix:///run/redis.sock?db=0&password={p}")
def test_mask_url_never_shows_a_generated_password(password: str, user: str, form: str) -> None:
    assume(password.strip() == password and _carried(form, user, password))
    shown = mask_url(_url(form, user, password))
    assert not _visible(password, shown, form, user), shown


@settings(max_examples=300, deadline=None)
@given(password=PASSWORDS, form=FORMS)
@example(password="p w s3cret", form="rediss://{u}:{p}@cache.internal:6380/2")
@example(password="a/b s3cret", form="redis://{u}:{p}@cache.internal:6379/0")
@example(password=";s3cret=", form="unix:///run/redis.sock?db=0&password={p}")
def test_settings_never_store_or_echo_a_generated_password(password: str, form: str) -> None:
    """What a scan writes to the run hash and the manifest (producer_view, public_view), or the error that
    refuses the URL: no password, encoded or not."""
    assume(password.strip() == password and _carried(form, "", password))
    shown, neutral = _settings_text(_url(form, "", password)), _settings_text(_url(form, "", "zz"))
    for secret in {password, quote(password, safe="")}:
        assume(secret not in neutral)  # "images", "null": words of the view itself
        assert secret not in shown, shown


def _settings_text(url: str) -> str:
    env = {"IRLIVE_REDIS_URL": url, "IRLIVE_OUTPUT": "s3://out/results"}
    try:
        s = Settings.from_env(env)
    except ConfigError as exc:
        return str(exc)
    return json.dumps([s.public_view(), s.producer_view(), s.enforced_view()])


@pytest.mark.parametrize("password", ["p w s3cret", "a/b s3cret", "s3c?ret#x"])
def test_irlive_config_shows_no_password(password: str) -> None:
    """The CLI a user types: the URL is accepted or refused, and either way the password is not printed."""
    env = {**os.environ, "IRLIVE_REDIS_URL": f"rediss://:{password}@127.0.0.1:1/0",
           "IRLIVE_OUTPUT": "s3://out/results", "IRLIVE_LOG_FORMAT": "text"}
    for args in (["config"], ["config", "--json"], ["status", "some-run"]):
        done = subprocess.run([str(IRLIVE_BIN), *args], env=env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode != 0 or "config" in args
        assert password not in done.stdout + done.stderr, (args, done.stdout, done.stderr)
        assert "s3cret" not in done.stdout + done.stderr and "s3c?ret" not in done.stdout + done.stderr
