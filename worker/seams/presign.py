"""Presigned S3 GET URLs, signed the way botocore signs them but without its per-URL work.

botocore's `generate_presigned_url` resolves the endpoint rules, fires a dozen event hooks and builds a
request dictionary for every URL: about 0.4 ms of CPU, and irlive signs a URL for every image twice (the
validation read and the seller's fetch). What varies between two URLs of one bucket is only the key, the
version and the time, so the endpoint (everything before the key) and the signing scope are learned once per
bucket from botocore's own presign, and each URL is then one `S3SigV4QueryAuth` signature, botocore's own
signer. `tests/test_presign.py` holds the two to the same bytes. Hand-written only because no library offers
a presign without the per-call pipeline.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest

# The key botocore is asked to presign to learn a bucket's URL layout; any key without special characters.
_PROBE_KEY = "irlive-probe"
# Query parameters of a presigned URL that the signer itself writes; anything else means the layout learned
# for the bucket carries parameters this signer would not reproduce, so botocore signs every URL of it.
_SIGNER_PARAMS = frozenset({"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                            "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token"})


class Presigner:
    """Thread-safe; `credentials` returns botocore credentials (refreshed by botocore where they expire)."""

    def __init__(self, client: Any, credentials: Callable[[], Any]) -> None:
        self._client = client
        self._credentials = credentials
        self._layouts: dict[str, tuple[str, str, str] | None] = {}
        self._lock = threading.Lock()

    def get_url(self, bucket: str, key: str, ttl_s: int, version_id: str | None = None) -> str:
        layout = self._layout(bucket)
        if layout is None:
            return self._botocore_url(bucket, key, ttl_s, version_id)
        base, region, service = layout
        request = AWSRequest(method="GET", url=base + quote(key, safe="/~"),
                             params={"versionId": version_id} if version_id else {})
        S3SigV4QueryAuth(self._credentials(), service, region, expires=ttl_s).add_auth(request)
        url: str = request.prepare().url
        return url

    def _botocore_url(self, bucket: str, key: str, ttl_s: int, version_id: str | None) -> str:
        params = {"Bucket": bucket, "Key": key, **({"VersionId": version_id} if version_id else {})}
        url: str = self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)
        return url

    def _layout(self, bucket: str) -> tuple[str, str, str] | None:
        """(URL before the key, signing region, signing service) of the bucket, or None to leave it to botocore."""
        with self._lock:
            if bucket in self._layouts:
                return self._layouts[bucket]
        probe = urlsplit(self._botocore_url(bucket, _PROBE_KEY, 60, None))
        query = dict(parse_qsl(probe.query, keep_blank_values=True))
        scope = query.get("X-Amz-Credential", "").split("/")
        layout: tuple[str, str, str] | None = None
        if (probe.path.endswith("/" + _PROBE_KEY) and set(query) <= _SIGNER_PARAMS and len(scope) == 5
                and scope[4] == "aws4_request" and not probe.fragment):
            base = f"{probe.scheme}://{probe.netloc}{probe.path[:-len(_PROBE_KEY)]}"
            layout = (base, scope[2], scope[3])
        with self._lock:
            self._layouts[bucket] = layout
        return layout
