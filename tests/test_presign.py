"""The light presigner signs exactly what botocore's generate_presigned_url signs (byte for byte, frozen clock)."""

from __future__ import annotations

import datetime
from typing import Any

import boto3
import botocore.auth
import pytest
from botocore.config import Config

from worker.seams.presign import Presigner

KEYS = ["a/b.png", "sp ace/ü+%2F~x.jpg", "//lead/../x.png", "a?b#c&d=e", "trail/", "x'y(z)*!$,;:@=.png", "日本/顔.png"]
VERSIONS = [None, "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY+MTRCxf3vjVBH40Nr8X8gdRQBpUMLUo"]
LAYOUTS = [
    ("http://127.0.0.1:9000", "path", "us-east-1", None),
    (None, "virtual", "eu-west-1", None),
    (None, "path", "us-east-1", None),
    (None, "auto", "us-west-2", "session-token/with+chars="),
    # The Host signed: without a default port, lowercase, brackets kept for IPv6.
    ("https://Storage.Example.com:443", "path", "eu-central-1", None),
    ("http://minio.local:80", "path", "us-east-1", None),
    ("http://[::1]:9000", "path", "us-east-1", None),
]


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = datetime.datetime(2026, 11, 30, 12, 0, 0)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: fixed)


def client_and_presigner(endpoint: str | None, style: str, region: str, token: str | None) -> tuple[Any, Presigner]:
    session = boto3.session.Session(aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="wJalrXUtnFEMI/K7MDENG",
                                    aws_session_token=token)
    client = session.client("s3", endpoint_url=endpoint, region_name=region,
                            config=Config(signature_version="s3v4", s3={"addressing_style": style}))
    return client, Presigner(client, lambda: session.get_credentials().get_frozen_credentials())


@pytest.mark.parametrize(("endpoint", "style", "region", "token"), LAYOUTS)
def test_urls_equal_botocore_for_every_key_version_and_bucket(endpoint: str | None, style: str, region: str,
                                                              token: str | None) -> None:
    client, presigner = client_and_presigner(endpoint, style, region, token)
    for bucket in ("captures-in", "my.dotted.bucket"):
        for key in KEYS:
            for version in VERSIONS:
                params = {"Bucket": bucket, "Key": key, **({"VersionId": version} if version else {})}
                expected = client.generate_presigned_url("get_object", Params=params, ExpiresIn=900)
                assert presigner.get_url(bucket, key, 900, version) == expected, (bucket, key, version)
        # The layout was learned (the light path was taken), not handed back to botocore each time.
        assert presigner._layouts[bucket] is not None


def test_a_layout_with_parameters_it_does_not_know_is_left_to_botocore() -> None:
    client, presigner = client_and_presigner("http://127.0.0.1:9000", "path", "us-east-1", None)
    calls: list[dict[str, Any]] = []
    real = client.generate_presigned_url

    def with_extra(method: str, Params: dict[str, Any], ExpiresIn: int) -> str:
        calls.append(Params)
        url: str = real(method, Params=Params, ExpiresIn=ExpiresIn) + "&x-custom=1"
        return url

    client.generate_presigned_url = with_extra
    first = presigner.get_url("captures-in", "a/b.png", 900)
    second = presigner.get_url("captures-in", "a/c.png", 900)
    assert presigner._layouts["captures-in"] is None
    assert first.endswith("&x-custom=1") and "a/c.png" in second
    assert [p["Key"] for p in calls] == ["irlive-probe", "a/b.png", "a/c.png"]
