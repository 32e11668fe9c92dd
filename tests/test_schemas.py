"""Every `--json` output and the notification payload have a JSON Schema in docs/schemas, and what the
commands really print on the real stack matches it."""

from __future__ import annotations

import argparse
import json
from typing import Any

import jsonschema
import pytest

from producer.cli import _parser
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, OUT_BUCKET, SCHEMAS, read_run, upload, validator
from tests.test_budget import clean_samples
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.ops.notify import run_end_event
from worker.seams.store import Store

# Output schemas of commands whose name differs from the schema's (one command, two shapes).
EXTRA_OUTPUTS = {"scan": ("scan-dry-run",)}
MANIFESTS = ("chunk", "record", "run", "payment")


def json_commands() -> list[str]:
    """Subcommands of `irlive` that take --json."""
    parser = _parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(name for name, sub in subs.choices.items()
                  if any("--json" in a.option_strings for a in sub._actions))


@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("*.schema.json")), ids=lambda p: p.name)
def test_every_schema_is_a_valid_draft_2020_12_schema(path: Any) -> None:
    doc = json.loads(path.read_text())
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["$id"].endswith("/" + path.name)
    jsonschema.Draft202012Validator.check_schema(doc)


def test_every_json_output_has_a_schema() -> None:
    have = {p.name.removesuffix(".schema.json") for p in SCHEMAS.glob("*.schema.json")}
    commands = json_commands()
    assert "scan" in commands and "status" in commands
    wanted = {n for c in commands for n in (c, *EXTRA_OUTPUTS.get(c, ()))} | {"notification"}
    assert wanted - have == set(), "write docs/schemas/<command>.schema.json for these"
    assert have - wanted - set(MANIFESTS) == set(), "schemas of outputs that no longer exist"


def ok_json(irlive: IrliveRunner, *args: str) -> Any:
    done = irlive(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_scan_status_and_operations_print_what_their_schemas_say(clean_stack: Stack, irlive: IrliveRunner) -> None:
    # No workers: the run stays running, so status shows a run in progress and the ops commands act on it.
    upload(clean_stack, clean_samples(25, prefix="schemas"))
    source = f"s3://{IN_BUCKET}/schemas"

    validator("scan-dry-run").validate(ok_json(irlive, "scan", source, "--dry-run"))
    scanned = ok_json(irlive, "scan", source)
    validator("scan").validate(scanned)
    run_id = scanned["run_id"]
    status = ok_json(irlive, "status", run_id)
    validator("status").validate(status)
    assert status["state"] in ("listing", "running") and status["total"] == 25
    for args, schema in [(("dlq",), "dlq"), (("wallet",), "wallet"), (("reindex",), "reindex"),
                         (("reconcile", run_id), "reconcile"), (("pause", run_id), "pause"),
                         (("resume", run_id), "resume"), (("cancel", run_id), "cancel")]:
        validator(schema).validate(ok_json(irlive, *args))


def test_a_finished_run_status_and_its_notification_match_their_schemas(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(12, prefix="notified"))
    clean_stack.start_worker()
    run_id = ok_json(irlive, "scan", f"s3://{IN_BUCKET}/notified")["run_id"]
    status = ok_json(irlive, "status", run_id, "--wait", "--timeout", "120")
    validator("status").validate(status)
    assert status["state"] == "done" and status["eta_s"] is None
    assert status["projected_spend_cents"] == status["spend_cents"]

    runs = Runs(Store.from_url(clean_stack.env["IRLIVE_REDIS_URL"]), Keys("irlive"))
    run = runs.get(run_id)
    assert run is not None
    manifest = read_run(clean_stack, run_id).manifest
    payload = run_end_event(run, manifest, "run.done")
    validator("notification").validate(payload)
    assert payload["counts"]["live"] == 12
    assert payload["manifest"] == f"s3://irlive-out/results/runs/{run_id}/manifest.json"


def test_config_prints_what_its_schema_says(tmp_path: Any) -> None:
    import os
    import subprocess

    from tests.conftest import IRLIVE_BIN

    env = {k: v for k, v in os.environ.items() if not k.startswith("IRLIVE_")}
    for extra, code in (({}, 0), ({"IRLIVE_API_KEY": "k", "IRLIVE_CHUNK_SIZE": "0", "IRLIVE_TYPO": "1"}, 1)):
        done = subprocess.run([str(IRLIVE_BIN), "config", "--no-redis", "--json"], env={**env, **extra},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == code, done.stderr
        validator("config").validate(json.loads(done.stdout))


def test_smoke_prints_what_its_schema_says(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(1, prefix="smoke"))
    done = irlive("smoke", f"s3://{IN_BUCKET}/smoke/img_00000.png", "--json")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip().splitlines()) == 1
    report = json.loads(done.stdout)
    validator("smoke").validate(report)
    assert report["verdict"] == "live"


@pytest.mark.integration
def test_demo_prints_what_its_schema_says_and_no_visibility_warning(tmp_path: Any) -> None:
    import os
    import subprocess

    from tests.conftest import IRLIVE_BIN

    env = {k: v for k, v in os.environ.items() if not k.startswith("IRLIVE_") or k == "IRLIVE_REDIS_SERVER"}
    done = subprocess.run([str(IRLIVE_BIN), "demo", "--images", "12", "--workers", "1", "--json",
                           "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    validator("demo").validate(summary)
    assert summary["ok"] and summary["state"] == "done" and summary["records"] == 12
    assert "VISIBILITY_TIMEOUT" not in done.stdout + done.stderr


def test_the_chunk_schema_carries_the_record_and_counts_definitions_as_they_are() -> None:
    chunk = json.loads((SCHEMAS / "chunk.schema.json").read_text())
    record = json.loads((SCHEMAS / "record.schema.json").read_text())
    run = json.loads((SCHEMAS / "run.schema.json").read_text())
    assert chunk["$defs"]["record"] == {k: v for k, v in record.items() if k not in ("$schema", "$id")}
    assert chunk["$defs"]["counts"] == run["$defs"]["counts"]


def test_what_a_run_writes_validates_with_plain_jsonschema_and_no_registry(clean_stack: Stack,
                                                                           irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(25, prefix="plain"))
    clean_stack.start_worker()
    run_id = ok_json(irlive, "scan", f"s3://{IN_BUCKET}/plain")["run_id"]
    done = irlive("status", run_id, "--wait", "--json", "--timeout", "90", timeout=120)
    assert json.loads(done.stdout)["state"] == "done", done.stdout
    output = read_run(clean_stack, run_id)

    def plain(name: str) -> dict[str, Any]:
        schema: dict[str, Any] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        return schema

    # What a user does with the shipped files: no registry, no network (a $ref to another file would fail).
    jsonschema.validate(output.manifest, plain("run"))
    for chunk in output.chunks:
        jsonschema.validate(chunk, plain("chunk"))
    body = clean_stack.s3_client().get_object(Bucket=OUT_BUCKET, Key=output.manifest["payments"]["key"])["Body"]
    payments = [json.loads(line) for line in body.read().decode().splitlines()]
    assert len(payments) == output.manifest["calls"] == 3
    for line in payments:
        jsonschema.validate(line, plain("payment"))
    # Numbers as numbers, images as a list of the identities the call carried.
    carried = sorted(i for p in payments for i in p["images"])
    assert carried == sorted(f"{r['bucket']}/{r['key']}@{r['etag']}" for r in output.records)
    assert all(isinstance(p["amount_cents"], int) and p["lost"] is False for p in payments)
