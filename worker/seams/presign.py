"""Presigned S3 GET URLs, byte for byte what botocore's generate_presigned_url makes, at a tenth of its CPU.

botocore resolves the endpoint rules, fires a dozen event hooks and builds a request dictionary for every URL
(about 170 us; its bare `S3SigV4QueryAuth` signer alone still takes 70 us, mostly URL parsing), and irlive
signs a URL for every image twice (the validation read and the seller's fetch). What varies between two URLs
of one bucket is only the key, the version and the time: the endpoint (everything before the key) and the
signing scope are learned once per bucket from botocore's own presign, and each URL is then the SigV4 query
signature of a GET with only the host header signed (AWS's "Authenticating Requests: Using Query
Parameters"), with the day's signing key cached. Hand-written because no library signs without that per-URL
work; `tests/test_presign.py` holds every URL to botocore's, byte for byte, across layouts, keys, versions and
session tokens, and a layout this signer would not reproduce is left to botocore.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import botocore.auth

# The key botocore is asked to presign to learn a bucket's URL layout; any key without special characters.
_PROBE_KEY = "irlive-probe"
# Query parameters of a presigned URL that the signer itself writes; anything else means the layout learned
# for the bucket carries parameters this signer would not reproduce, so botocore signs every URL of it.
_SIGNER_PARAMS = frozenset({"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                            "X-Amz-SignedHeaders", "X-Amz-Signature", "X-Amz-Security-Token"})


class Presigner:
    """Thread-safe; `credentials` returns frozen botocore credentials (refreshed by botocore where they expire)."""

    def __init__(self, client: Any, credentials: Callable[[], Any]) -> None:
        self._client = client
        self._credentials = credentials
        self._layouts: dict[str, tuple[str, str, str] | None] = {}
        self._keys: dict[tuple[str, str, str, str], bytes] = {}
        self._lock = threading.Lock()

    def get_url(self, bucket: str, key: str, ttl_s: int, version_id: str | None = None) -> str:
        layout = self._layout(bucket)
        if layout is None:
            return self._botocore_url(bucket, key, ttl_s, version_id)
        base, region, service = layout
        creds = self._credentials()
        # The clock botocore's own signer reads.
        stamp = botocore.auth.get_current_datetime().strftime("%Y%m%dT%H%M%SZ")
        scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
        url = base + quote(key, safe="/~")
        split = urlsplit(url)
        operation = [("versionId", version_id)] if version_id else []
        auth = [("X-Amz-Algorithm", "AWS4-HMAC-SHA256"), ("X-Amz-Credential", f"{creds.access_key}/{scope}"),
                ("X-Amz-Date", stamp), ("X-Amz-Expires", str(ttl_s)), ("X-Amz-SignedHeaders", "host")]
        if creds.token is not None:
            auth.append(("X-Amz-Security-Token", creds.token))
        pairs = [(_enc(k), _enc(v)) for k, v in operation + auth]
        canonical = "\n".join(["GET", split.path, "&".join(f"{k}={v}" for k, v in sorted(pairs)),
                               f"host:{_host(split.scheme, split.netloc)}\n", "host", "UNSIGNED-PAYLOAD"])
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(creds.secret_key, stamp[:8], region, service), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        query = "&".join(f"{k}={v}" for k, v in pairs)
        return f"{url}?{query}&X-Amz-Signature={signature}"

    def _signing_key(self, secret: str, day: str, region: str, service: str) -> bytes:
        cache_key = (secret, day, region, service)
        found = self._keys.get(cache_key)
        if found is None:
            found = ("AWS4" + secret).encode()
            for part in (day, region, service, "aws4_request"):
                found = hmac.new(found, part.encode(), hashlib.sha256).digest()
            with self._lock:
                if len(self._keys) > 64:
                    self._keys.clear()
                self._keys[cache_key] = found
        return found

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


def _enc(text: str) -> str:
    return quote(text, safe="-_.~")


def _host(scheme: str, netloc: str) -> str:
    """The Host header botocore signs: lowercase, no userinfo, the port only where it is not the default."""
    host = netloc.rpartition("@")[2].lower()
    name, colon, port = host.rpartition(":")
    if colon and not host.endswith("]") and port == {"http": "80", "https": "443"}.get(scheme):
        return name
    return host
