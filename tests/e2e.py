"""Shared steps of the end-to-end tests: upload captures, scan through the CLI, read what the run wrote."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow.parquet as pq
import referencing

from sandbox.images import Sample
from sandbox.stack import Stack
from tests.conftest import IrliveRunner

SCHEMAS = Path(__file__).resolve().parents[1] / "docs" / "schemas"
OUT_BUCKET, OUT_PREFIX = "irlive-out", "results"
IN_BUCKET = "irlive-in"
SECRET_PATTERNS = re.compile(r"X-Amz-Signature|X-Amz-Credential|Signature=|AWSAccessKeyId=|X-Payment-Token:\s*\S")


@dataclass
class RunOutput:
    """Everything a finished run left in S3."""

    run_id: str
    manifest: dict[str, Any]
    chunks: list[dict[str, Any]]
    failed_jsonl: str

    @property
    def records(self) -> list[dict[str, Any]]:
        return [r for c in self.chunks for r in c["images"]]


def upload(stack: Stack, samples: Iterable[Sample], bucket: str = IN_BUCKET) -> None:
    s3 = stack.s3_client()
    for sample in samples:
        s3.put_object(Bucket=bucket, Key=sample.key, Body=sample.body)


def wait_done(irlive: IrliveRunner, run_id: str, timeout: float = 90) -> dict[str, Any]:
    """`irlive status RUN --wait --json` until the run is done; its exit code is the README's: 6 when images ended
    `error`, else 0. Returns the status document."""
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", str(timeout), timeout=timeout + 30)
    doc: dict[str, Any] = json.loads(waited.stdout)
    assert doc["state"] == "done", waited.stdout
    assert waited.returncode == (6 if doc["errors"] else 0), waited.stdout + waited.stderr
    return doc


def read_run(stack: Stack, run_id: str) -> RunOutput:
    s3 = stack.s3_client()

    def get(key: str) -> bytes:
        body: bytes = s3.get_object(Bucket=OUT_BUCKET, Key=key)["Body"].read()
        return body

    base = f"{OUT_PREFIX}/runs/{run_id}"
    manifest = json.loads(get(f"{base}/manifest.json"))
    chunks = [json.loads(get(c["key"])) for c in manifest["chunks"]]
    return RunOutput(run_id, manifest, chunks, get(f"{base}/failed.jsonl").decode())


def validator(name: str) -> jsonschema.protocols.Validator:
    resources = []
    for path in SCHEMAS.glob("*.schema.json"):
        doc = json.loads(path.read_text())
        resources.append((doc["$id"], referencing.Resource.from_contents(doc)))
        resources.append((path.name, referencing.Resource.from_contents(doc)))
    registry: referencing.Registry[Any] = referencing.Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, registry=registry, format_checker=jsonschema.FormatChecker())


def all_output_text(stack: Stack) -> str:
    """Every object under the output bucket, concatenated, for leak checks (results.parquet read as its rows:
    its pages are compressed)."""
    s3 = stack.s3_client()
    texts = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=OUT_BUCKET):
        for obj in page.get("Contents", ()):
            body = s3.get_object(Bucket=OUT_BUCKET, Key=obj["Key"])["Body"].read()
            if obj["Key"].endswith(".parquet"):
                texts.append(json.dumps(pq.read_table(io.BytesIO(body)).to_pylist()))
            else:
                texts.append(body.decode())
    return "\n".join(texts)


def payment_tokens(stack: Stack) -> list[str]:
    r = stack.redis_client()
    tokens = []
    for key in r.scan_iter("irlive:pay:*"):
        token = r.hget(key, "token")
        if token:
            tokens.append(token.decode() if isinstance(token, bytes) else token)
    return tokens


# A throwaway payer key for x402 runs: the sandbox settles on no chain, so this account never holds anything.
X402_KEY = "0x" + "5d" * 32
X402_ENV = {"IRLIVE_PAYMENT_METHOD": "x402", "IRLIVE_X402_PRIVATE_KEY": X402_KEY}

# What must appear nowhere: the key (with or without 0x), an EIP-712 signature (65 bytes in hex), a payment header.
# A payment header's value is base64 of a JSON document starting {"x402Version": eyJ4NDAy... in any form sent.
X402_SECRET = re.compile(X402_KEY[2:] + r"|(0x)?[0-9a-fA-F]{130}|PAYMENT-SIGNATURE:\s*\S|X-PAYMENT:\s*\S|eyJ4NDAy",
                         re.I)
