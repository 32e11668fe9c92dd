"""`irlive config`: effective values, their sources, masking, the workers' checks and exit codes; and the one
visibility-timeout number the docs and shipped files must agree with. No servers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.cli import main
from producer.config_cmd import inspect_settings
from tests.e2e import validator
from worker.config import Settings
from worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VT = Settings().visibility_timeout
# Nothing listens on port 1: a refused connection is immediate.
UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in [v for v in os.environ if v.startswith("IRLIVE_")]:
        monkeypatch.delenv(var)


def run_config(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code = main(["config", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_defaults_are_listed_with_their_source_and_the_derived_visibility_timeout() -> None:
    doc = inspect_settings({}, check_redis=False).as_dict()
    assert set(doc["settings"]) == set(Settings.variables().values())
    assert all(s["source"] == "default" and s["valid"] for s in doc["settings"].values())
    assert doc["settings"]["IRLIVE_CHUNK_SIZE"]["value"] == 50
    assert doc["settings"]["IRLIVE_EVENT_BUCKETS"]["value"] == []
    assert doc["settings"]["IRLIVE_OUTPUT"]["value"] is None
    assert doc["visibility_timeout_s"] == DEFAULT_VT == 2 * doc["worst_chunk_s"]
    assert doc["visibility_timeout_source"] == "derived"
    assert doc["ok"] is True and doc["problems"] == []
    validator("config").validate(doc)


def test_environment_values_are_parsed_and_marked_as_such() -> None:
    env = {"IRLIVE_CHUNK_SIZE": "20", "IRLIVE_OUTPUT": "s3://results-bucket/p", "IRLIVE_EVENT_RUN_WINDOW": "10m",
           "IRLIVE_RATE_ADAPTIVE": "no", "IRLIVE_S3_REGION": ""}
    doc = inspect_settings(env, check_redis=False).as_dict()
    got = doc["settings"]
    assert got["IRLIVE_CHUNK_SIZE"] == {"value": 20, "source": "environment", "valid": True}
    assert got["IRLIVE_OUTPUT"]["value"] == "s3://results-bucket/p"
    assert got["IRLIVE_EVENT_RUN_WINDOW"]["value"] == 600
    assert got["IRLIVE_RATE_ADAPTIVE"]["value"] is False
    # An empty value is unset, as the workers read it (the env example relies on it).
    assert got["IRLIVE_S3_REGION"]["source"] == "default"
    # The derived timeout follows the settings it is derived from.
    assert doc["visibility_timeout_s"] == Settings(chunk_size=20).visibility_timeout < DEFAULT_VT
    assert doc["ok"]
    validator("config").validate(doc)


def test_secrets_and_url_credentials_never_show() -> None:
    env = {"IRLIVE_API_KEY": "sk-live-abcdef", "IRLIVE_NOTIFY_SECRET": "hmac-key-123",
           "IRLIVE_NOTIFY_URL": "https://hooks.example.com/services/T000/B000/XXXXSECRET",
           "IRLIVE_REDIS_URL": "redis://admin:hunter2@redis.internal:6379/0",
           "IRLIVE_S3_ENDPOINT_URL": "https://user:pass@s3.example.com"}
    report = inspect_settings(env, check_redis=False)
    doc = report.as_dict()
    text = json.dumps(doc) + report.render()
    for secret in ("sk-live-abcdef", "hmac-key-123", "XXXXSECRET", "hunter2", "admin", "pass@"):
        assert secret not in text
    got = doc["settings"]
    assert got["IRLIVE_API_KEY"]["value"] == got["IRLIVE_NOTIFY_SECRET"]["value"] == "***"
    assert got["IRLIVE_REDIS_URL"]["value"] == "redis://***@redis.internal:6379/0"
    assert got["IRLIVE_NOTIFY_URL"]["value"] == "https://hooks.example.com/***"
    assert got["IRLIVE_S3_ENDPOINT_URL"]["value"] == "https://***@s3.example.com"
    assert got["IRLIVE_API_KEY_HEADER"]["value"] == "X-API-Key"  # a header's name is not a secret


def test_an_invalid_secret_or_url_is_reported_without_its_value() -> None:
    env = {"IRLIVE_API_KEY": "bad\x01key-zzz", "IRLIVE_MARKETPLACE_URL": "ftp://u:topsecret@x"}
    report = inspect_settings(env, check_redis=False)
    text = json.dumps(report.as_dict()) + report.render()
    assert "zzz" not in text and "topsecret" not in text
    assert any("IRLIVE_API_KEY" in p for p in report.problems)
    assert any("IRLIVE_MARKETPLACE_URL" in p for p in report.problems)


def test_every_problem_is_listed_not_only_the_first() -> None:
    env = {"IRLIVE_CHUNK_SIZE": "0", "IRLIVE_IMAGES_PER_CALL": "eleven", "IRLIVE_MIN_IMAGE_SIDE": "5000",
           "IRLIVE_EVENT_RUN_WINDOW": "7m", "IRLIVE_PRESIGN_TTL": "600"}
    report = inspect_settings(env, check_redis=False)
    problems = "\n".join(report.problems)
    for var in ("IRLIVE_CHUNK_SIZE", "IRLIVE_IMAGES_PER_CALL", "IRLIVE_MAX_IMAGE_SIDE", "IRLIVE_EVENT_RUN_WINDOW"):
        assert var in problems
    invalid = {e.var for e in report.entries if not e.valid}
    assert invalid == {"IRLIVE_CHUNK_SIZE", "IRLIVE_IMAGES_PER_CALL", "IRLIVE_MIN_IMAGE_SIDE",
                       "IRLIVE_EVENT_RUN_WINDOW"}
    assert not report.ok
    # The worker refuses the same environment.
    with pytest.raises(ConfigError):
        Settings.from_env(env)
    validator("config").validate(report.as_dict())


def test_a_visibility_timeout_the_workers_warn_about_is_a_problem() -> None:
    report = inspect_settings({"IRLIVE_VISIBILITY_TIMEOUT_S": "3600"}, check_redis=False)
    doc = report.as_dict()
    assert doc["visibility_timeout_s"] == 3600 and doc["visibility_timeout_source"] == "environment"
    assert not report.ok and f"Leave it unset (derived: {DEFAULT_VT} s" in report.problems[0]
    fine = inspect_settings({"IRLIVE_VISIBILITY_TIMEOUT_S": str(DEFAULT_VT)}, check_redis=False)
    assert fine.ok


def test_unknown_irlive_variables_are_noted_not_failed() -> None:
    report = inspect_settings({"IRLIVE_RATE_LIMIT": "3", "IRLIVE_REDIS_SERVER": "/usr/bin/redis-server"},
                              check_redis=False)
    assert report.ok
    assert report.notes == ["IRLIVE_RATE_LIMIT is set but irlive reads no such setting (a typo?)"]


def test_exit_codes_and_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc = run_config(capsys, "--no-redis")
    assert code == 0 and doc["ok"] and doc["redis"]["checked"] is False
    validator("config").validate(doc)

    monkeypatch.setenv("IRLIVE_CHUNK_SIZE", "0")
    code, doc = run_config(capsys, "--no-redis")
    assert code == 1 and doc["problems"] and doc["settings"]["IRLIVE_CHUNK_SIZE"]["valid"] is False
    validator("config").validate(doc)

    code = main(["config", "--no-redis"])
    out = capsys.readouterr().out
    assert code == 1 and "problem: IRLIVE_CHUNK_SIZE=0 is out of range" in out and "NOT OK" in out


def test_unreachable_redis_is_a_note_as_for_workers(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("IRLIVE_REDIS_URL", UNREACHABLE)
    code, doc = run_config(capsys)
    assert code == 0, doc
    assert doc["redis"]["checked"] is False and any("not checked" in n for n in doc["notes"])
    validator("config").validate(doc)


def test_a_redis_workers_refuse_is_a_problem(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import worker.ops.durability as durability

    def refuse(*_: Any, **__: Any) -> Any:
        raise ConfigError("the Redis at x is not safe to keep money in: it keeps nothing on disk")

    monkeypatch.setattr(durability, "require_durable", refuse)
    monkeypatch.setenv("IRLIVE_REDIS_URL", UNREACHABLE)
    code, doc = run_config(capsys)
    assert code == 1 and "not safe to keep money in" in doc["problems"][0]


# ---------------------------------------------------------------- one visibility-timeout number


def test_docs_and_shipped_settings_agree_with_the_computed_visibility_timeout() -> None:
    numbers = re.compile(r"(\d[\d,]*)\s*s\b")
    for doc in ("README.md", "deploy/README.md"):
        text = (ROOT / doc).read_text()
        lines = [line for line in text.splitlines() if "isibility" in line and numbers.search(line)]
        said = {int(n.replace(",", "")) for line in lines for n in numbers.findall(line)
                if "worst" in line or "visibility timeout" in line.lower()}
        assert str(DEFAULT_VT) in text, f"{doc} does not give the computed visibility timeout ({DEFAULT_VT} s)"
        assert not {n for n in said if n > 600} - {DEFAULT_VT}, f"{doc}: another visibility timeout in {lines}"
    for env_file in ROOT.glob("deploy/**/*.env.example"):
        values = dict(line.split("=", 1) for line in env_file.read_text().splitlines()
                      if line and not line.startswith("#") and "=" in line)
        assert values.get("IRLIVE_VISIBILITY_TIMEOUT_S", "") == "", f"{env_file} sets the visibility timeout"
    configmap = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text())
    assert "IRLIVE_VISIBILITY_TIMEOUT_S" not in configmap["data"]


def test_the_shipped_settings_pass_and_give_the_documented_number() -> None:
    env_example = dict(line.split("=", 1) for line in (ROOT / "deploy/irlive.env.example").read_text().splitlines()
                       if line and not line.startswith("#"))
    configmap = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text())["data"]
    for env in (env_example, configmap):
        report = inspect_settings(env, check_redis=False)
        assert report.ok, report.problems
        assert report.as_dict()["visibility_timeout_s"] == DEFAULT_VT == Settings.from_env(env).visibility_timeout
        assert report.as_dict()["settings"]["IRLIVE_API_KEY"]["value"] in (None, "***")


# A sitecustomize that makes one top-level module unimportable, as in an image built without its extra.
_HIDE = '''import sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {name!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}")
        return None
sys.meta_path.insert(0, _Hide())
'''


@pytest.mark.parametrize(("method", "module", "extra"), [("x402", "x402", "irlive[x402]"),
                                                        ("mcp-token", "mcp", "irlive[mcp]")])
def test_a_way_to_pay_without_its_extra_is_named_and_exits_2(tmp_path: Path, method: str, module: str,
                                                             extra: str) -> None:
    """`irlive config` and a worker's start both name the extra to install for the configured method, exit 2."""
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(_HIDE.format(name=module))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("IRLIVE_")},
           "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "IRLIVE_PAYMENT_METHOD": method,
           "IRLIVE_X402_PRIVATE_KEY": "0x" + "5d" * 32, "IRLIVE_REDIS_URL": UNREACHABLE}
    config = subprocess.run([sys.executable, "-m", "producer", "config", "--no-redis", "--json"], env=env,
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert config.returncode == 2, config.stdout + config.stderr
    doc = json.loads(config.stdout)
    assert extra in doc["missing_extra"] and any(extra in p for p in doc["problems"])
    assert "5d5d5d" not in config.stdout
    validator("config").validate(doc)
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "solo"], env=env,
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert worker.returncode == 2, worker.stdout + worker.stderr
    assert extra in worker.stderr


def test_nothing_is_missing_for_the_token_method_or_here() -> None:
    from worker.config import missing_extra

    assert missing_extra("token") is None
    assert missing_extra("x402") is None and missing_extra("mcp-token") is None, "the dev venv holds both extras"
