"""S3 access: list, head, ranged get, presign, JSON put/get; the only place that catches botocore errors."""

from __future__ import annotations

import http.client
import io
import itertools
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

import boto3
import botocore.session
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
)
from botocore.httpsession import URLLib3Session, get_cert_path
from botocore.parsers import DEFAULT_TIMESTAMP_PARSER
from botocore.utils import get_environ_proxies

from worker.backoff import Backoff
from worker.errors import AccessRefused, ConfigError, NotFound, ObjectRefused, TransientError
from worker.seams.presign import Presigner
from worker.seams.reads import Answer, Reader

# A validation read signs its own URL; it is used at once, so it need not live long.
_READ_URL_TTL_S = 300
# Attempts of a raw ranged read on a connection error or a 5xx, as botocore's standard retry mode makes.
_READ_ATTEMPTS = 3
# The most pages one overwrite-check listing reads before asking the keys it has not reached by HEAD: one sized
# to the keys wanted, then two of 1,000.
LIST_PAGES = 3
_READ_BACKOFF = Backoff(base_s=0.5, cap_s=8.0)
# What is read of an error's body: its XML, which names the code.
_ERROR_BYTES = 64 * 1024
# The most of a listing page read raw: 1,000 keys of up to 1,024 bytes with their metadata fit ~1.3 MB; a page
# that does not (or does not parse) is listed again through botocore.
_LIST_BYTES = 4 * 1024 * 1024
_S3_XML = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_XML_FIELD = "<{0}>([^<]{{0,1024}})</{0}>"
_CONFIG_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "NoSuchBucket",
                 "InvalidBucketName", "AllAccessDisabled", "ExpiredToken", "InvalidToken"}
# What S3 answers about one object that it will not serve, whatever the credentials: the image is refused, not
# the run. (code -> error_code on the record, and what to do.)
_OBJECT_CODES = {
    "InvalidObjectState": ("archived", "the object is archived (Glacier / Deep Archive): restore it, then rescan"),
    "KeyTooLongError": ("key_too_long", "the key is longer than S3 accepts"),
}


@dataclass(frozen=True)
class ObjectInfo:
    """What HEAD (or a listing) says of an object."""

    key: str
    size: int
    etag: str
    # Set when the bucket is versioned: the exact version read, so a presigned URL can pin it.
    version_id: str | None = None
    # From a listing (or an inventory row): when the object was written; None where the source does not say.
    last_modified: datetime | None = None


class ObjectStream(io.RawIOBase):
    """An object's body being read: a connection lost halfway is a TransientError like any other S3 trouble."""

    def __init__(self, body: Any, where: str) -> None:
        super().__init__()
        self._body = body
        self._where = where

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        with _translate(self._where):
            data: bytes = self._body.read(None if size is None or size < 0 else size)
            return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class Storage:
    """A thin, thread-safe wrapper over one boto3 S3 client."""

    def __init__(self, endpoint_url: str | None, region: str = "us-east-1", max_connections: int = 32,
                 credentials: tuple[str, str] | None = None) -> None:
        # Path style and SigV4 always: with a custom endpoint boto3 would otherwise presign SigV2.
        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            max_pool_connections=max_connections,
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=30,
        )
        keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]} if credentials else {}
        core = botocore.session.get_session()
        # botocore parses every LastModified with dateutil (most of a listing's CPU); ISO 8601 is all S3 sends
        # in XML, which the standard library reads in C.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
        try:
            session = boto3.session.Session(botocore_session=core, **keys)
            self._s3 = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        except ProfileNotFound as exc:
            raise ConfigError(f"AWS_PROFILE names a profile that does not exist: {exc}") from None
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(f"cannot build the S3 client (IRLIVE_S3_ENDPOINT_URL, IRLIVE_S3_REGION): {exc}") from None
        self._presigner = Presigner(self._s3, lambda: _frozen(session))
        self._reachable: set[str] = set()
        # Validation reads are presigned ranged GETs sent without the client's request pipeline, on bare
        # kept-alive connections (worker/seams/reads.py: about half the CPU of botocore's HTTP session); with a
        # proxy configured for S3 they go through botocore's session, which knows its proxies.
        ca_bundle = os.environ.get("AWS_CA_BUNDLE")
        proxies = get_environ_proxies(endpoint_url or f"https://s3.{region}.amazonaws.com")
        self._reader: Reader | None = None
        self._proxied: URLLib3Session | None = None
        if proxies:
            self._proxied = URLLib3Session(verify=ca_bundle or True, proxies=proxies, timeout=(10, 30),
                                           max_pool_connections=max_connections)
        else:
            self._reader = Reader(ca_file=ca_bundle or get_cert_path(True), connect_timeout_s=10,
                                  read_timeout_s=30, max_idle_per_host=max_connections)

    def iter_objects(self, bucket: str, prefix: str = "", page_size: int = 1000) -> Iterator[ObjectInfo]:
        """Stream every object under prefix, page by page: memory does not grow with the bucket."""
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
        with _translate(f"s3://{bucket}/{prefix}"):
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"], int(obj["Size"]), _etag(obj["ETag"]),
                                     last_modified=obj.get("LastModified"))

    def iter_level(self, bucket: str, prefix: str = "", delimiter: str = "/") -> Iterator[ObjectInfo | str]:
        """One level under prefix: the objects directly in it, and each sub-prefix (a str) below it."""
        paginator = self._s3.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter=delimiter,
                                   PaginationConfig={"PageSize": 1000})
        with _translate(f"s3://{bucket}/{prefix}"):
            for page in pages:
                for common in page.get("CommonPrefixes", ()):
                    yield str(common["Prefix"])
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"], int(obj["Size"]), _etag(obj["ETag"]),
                                     last_modified=obj.get("LastModified"))

    def open_stream(self, bucket: str, key: str) -> ObjectStream:
        """The object's body as a file-like stream (read in pieces: an inventory file is never held whole)."""
        where = f"s3://{bucket}/{key}"
        with _translate(where, missing_is_object=True):
            return ObjectStream(self._s3.get_object(Bucket=bucket, Key=key)["Body"], where)

    def read_head(self, bucket: str, key: str, max_bytes: int) -> tuple[ObjectInfo, bytes]:
        """The first bytes with the object's size and ETag, in one request (no HEAD); empty objects too.

        An object S3 will not serve alone (archived, denied by its own ACL or a policy on its key, a key too long)
        is an ObjectRefused; a denial of the whole bucket stays a ConfigError that stops the run.
        """
        try:
            return self._read_head(bucket, key, max_bytes)
        except AccessRefused as exc:
            if exc.code not in ("AccessDenied", "403") or not self._bucket_reachable(bucket):
                raise
            raise ObjectRefused(f"s3://{bucket}/{key}: S3 denies this object (AccessDenied) though the bucket "
                                "is readable: check its ACL, KMS key or a policy on its key",
                                code="access_denied") from None

    def _bucket_reachable(self, bucket: str) -> bool:
        """Whether the bucket answers HEAD (the workers' ListBucket right). A yes is kept; a no is asked again
        next time (it may have been a passing network error, and a no stops the run)."""
        if bucket in self._reachable:
            return True
        try:
            self._s3.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError):
            return False
        self._reachable.add(bucket)
        return True

    def _read_head(self, bucket: str, key: str, max_bytes: int) -> tuple[ObjectInfo, bytes]:
        where = f"s3://{bucket}/{key}"
        with _translate(where, missing_is_object=True):
            answer = self._get_retried(where, lambda: self._presigner.get_url(bucket, key, _READ_URL_TTL_S),
                                       {"Range": f"bytes=0-{max_bytes - 1}"}, max_bytes)
            return _head_of(key, answer)

    def _get_retried(self, where: str, url: Callable[[], str], headers: dict[str, str], max_bytes: int) -> Answer:
        """A GET of a presigned URL (signed anew for each attempt), tried again on a connection error or a 5xx
        as botocore's standard retry mode would; the last answer is returned whatever its status."""
        for attempt in range(_READ_ATTEMPTS):
            try:
                answer = self._get(url(), headers, max_bytes)
            except (BotoCoreError, OSError, http.client.HTTPException) as exc:
                if attempt + 1 == _READ_ATTEMPTS:
                    if isinstance(exc, BotoCoreError):
                        raise
                    raise TransientError(f"{where}: S3 read failed ({type(exc).__name__})") from None
            else:
                if answer.status < 500 or attempt + 1 == _READ_ATTEMPTS:
                    return answer
            time.sleep(_READ_BACKOFF.delay(attempt))
        raise AssertionError("unreachable")

    def _get(self, url: str, headers: dict[str, str], max_bytes: int) -> Answer:
        """A GET of a presigned URL: at most max_bytes of a 200/206 body, or 64 KiB of an error's (its XML)."""
        if self._reader is not None:
            return self._reader.get(url, headers, max_bytes, _ERROR_BYTES)
        assert self._proxied is not None  # __init__ sets one of the two
        request = AWSRequest(method="GET", url=url, headers=headers)
        request.stream_output = True
        response = self._proxied.send(request.prepare())
        limit = max_bytes if response.status_code in (200, 206) else _ERROR_BYTES
        return Answer(response.status_code, {name.lower(): value for name, value in response.headers.items()},
                      _read_up_to(response, limit))

    def read_range(self, bucket: str, key: str, byte_range: str, etag: str | None = None) -> bytes:
        """Read `bytes=a-b` or `bytes=-n`; with etag, fail as not_found if the object changed meanwhile."""
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        with _translate(f"s3://{bucket}/{key}", missing_is_object=True):
            answer = self._s3.get_object(Bucket=bucket, Key=key, Range=byte_range, **extra)
            data: bytes = answer["Body"].read()
        return data

    def presign_get(self, bucket: str, key: str, ttl_s: int, version_id: str | None = None) -> str:
        """A GET URL the seller can fetch; with version_id it fetches that version, whatever is written since."""
        with _translate(f"s3://{bucket}/{key}"):
            return self._presigner.get_url(bucket, key, ttl_s, version_id)

    def current_etags(self, bucket: str, keys: list[str]) -> dict[str, str]:
        """The ETags the objects have now; a key that is gone is absent from the answer.

        Keys are taken per "directory" (the part before the last `/`: a camera, a day): one listing over the
        range from its first key to its last reads them together, at most LIST_PAGES pages (the range may hold
        many older objects: an event chunk's images from two cameras of a million-image bucket); a directory
        with one key, and keys a listing did not reach within its pages, are asked with a HEAD each.
        """
        found: dict[str, str] = {}
        for _, group in itertools.groupby(sorted(set(keys)), key=lambda k: k.rpartition("/")[0]):
            wanted = list(group)
            reached = ""
            if len(wanted) > 1:
                listed, reached = self._list_range(bucket, wanted)
                found.update(listed)
            for key in wanted:
                if key in found or key <= reached:
                    continue  # read, or listed past and absent: gone
                etag = self._head_etag(bucket, key)
                if etag is not None:
                    found[key] = etag
        return found

    def _list_range(self, bucket: str, wanted: list[str]) -> tuple[dict[str, str], str]:
        """ETags of `wanted` (sorted, one directory) listed from the first to the last, at most LIST_PAGES
        pages; and the last key the listing covered (the last wanted one if it got there).

        The first page asks for about twice as many keys as are wanted, the next ones for 1,000: a chunk's keys
        usually lie together, and botocore parses every key a page holds (a page of 1,000 costs the worker
        40-55 ms, one of 100 7-9 ms: bench/reads.py, docs/BENCHMARKS.md)."""
        first, last = wanted[0], wanted[-1]
        # The characters every key starts with (those of the smallest and the largest are those of all).
        prefix = next((first[:i] for i, (a, b) in enumerate(zip(first, last, strict=False)) if a != b),
                      first[:min(len(first), len(last))])
        members = set(wanted)
        found: dict[str, str] = {}
        # StartAfter is exclusive: a proper prefix of the first key sorts just before it.
        ask: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "StartAfter": first[:-1],
                               "MaxKeys": min(1000, 2 * len(wanted) + 8)}
        where = f"s3://{bucket}/{prefix}"
        with _translate(where):
            for n in range(1, LIST_PAGES + 1):
                contents, following = self._list_page(where, ask)
                for key, etag in contents:
                    if key in members:
                        found[key] = etag
                    if key >= last:
                        return found, last
                if following is None:
                    return found, last  # the range holds nothing more
                if n == LIST_PAGES:
                    return found, contents[-1][0] if contents else first[:-1]
                ask = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000, "ContinuationToken": following}
        return found, last

    def _list_page(self, where: str, ask: dict[str, Any]) -> tuple[list[tuple[str, str]], str | None]:
        """One ListObjectsV2 page: its (key, ETag) pairs and the token of the next page (None: the last).

        Read as a presigned GET on the validation reads' connections and parsed with the standard library's
        XML parser in C: botocore's request pipeline and response parser cost the worker ~5 ms of CPU for a
        chunk's page, most of the overwrite check (`bench/reads.py`). botocore still signs the URL (its
        handlers add `encoding-type=url`, so keys come back percent-encoded, as botocore decodes them), and
        lists through a proxy, and whatever page this does not read whole."""
        if self._reader is not None:
            # A copy: botocore's handlers write EncodingType into the parameters they are given, and a listing
            # made with it set by the caller is not decoded.
            answer = self._get_retried(where, lambda: self._s3.generate_presigned_url(
                "list_objects_v2", Params=dict(ask), ExpiresIn=_READ_URL_TTL_S), {}, _LIST_BYTES)
            if answer.status != 200:
                raise ClientError({"Error": {"Code": _xml_field(answer.body, "Code") or str(answer.status),
                                             "Message": _xml_field(answer.body, "Message") or ""},
                                   "ResponseMetadata": {"HTTPStatusCode": answer.status}}, "ListObjectsV2")
            page = _listing(answer.body)
            if page is not None:
                return page
        listed = self._s3.list_objects_v2(**ask)
        return ([(obj["Key"], _etag(obj["ETag"])) for obj in listed.get("Contents", ())],
                listed.get("NextContinuationToken") if listed.get("IsTruncated") else None)

    def _head_etag(self, bucket: str, key: str) -> str | None:
        try:
            with _translate(f"s3://{bucket}/{key}", missing_is_object=True):
                return _etag(self._s3.head_object(Bucket=bucket, Key=key)["ETag"])
        except NotFound:
            return None

    def put_json(self, bucket: str, key: str, doc: Any) -> str:
        body = json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=True).encode()
        return self.put_bytes(bucket, key, body, "application/json")

    def put_bytes(self, bucket: str, key: str, body: bytes, content_type: str) -> str:
        with _translate(f"s3://{bucket}/{key}"):
            answer = self._s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        return _etag(answer["ETag"])

    def get_json(self, bucket: str, key: str) -> tuple[Any, str]:
        """The parsed document and its ETag."""
        with _translate(f"s3://{bucket}/{key}", missing_is_object=True):
            answer = self._s3.get_object(Bucket=bucket, Key=key)
            body = answer["Body"].read()
        return json.loads(body), _etag(answer["ETag"])

    def get_bytes(self, bucket: str, key: str) -> bytes:
        with _translate(f"s3://{bucket}/{key}", missing_is_object=True):
            data: bytes = self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return data

    def ensure_bucket(self, bucket: str) -> None:
        with _translate(f"s3://{bucket}"):
            try:
                self._s3.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
                self._s3.create_bucket(Bucket=bucket)

    def check_bucket(self, bucket: str) -> None:
        """Fail with a ConfigError naming the bucket when it does not exist.

        A 403 passes: least-privilege policies grant ListBucket only under a prefix, and HeadBucket needs it
        on the whole bucket. Real access problems then surface on the listing or the first read.
        """
        try:
            self._s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            code = _code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise ConfigError(f"bucket {bucket!r} does not exist") from None
            if code in ("403", "AccessDenied", "Forbidden"):
                return
            with _translate(f"s3://{bucket}"):
                raise
        except (BotoCoreError, NoCredentialsError):
            with _translate(f"s3://{bucket}"):
                raise


@contextmanager
def _translate(where: str, *, missing_is_object: bool = False) -> Iterator[None]:
    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey", "404", "NotFound", "PreconditionFailed", "412") and missing_is_object:
            raise NotFound(f"{where}: object not found or changed since it was listed") from None
        if code in _OBJECT_CODES and missing_is_object:
            error_code, why = _OBJECT_CODES[code]
            raise ObjectRefused(f"{where}: {why} ({code})", code=error_code) from None
        if code in _CONFIG_CODES or status in (401, 403):
            raise AccessRefused(f"{where}: S3 refused access ({code}); check the bucket name and credentials",
                                code) from None
        if code in ("InvalidRange", "416"):
            raise NotFound(f"{where}: object is empty or shorter than expected") from None
        if status >= 500 or code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"):
            raise TransientError(f"{where}: S3 answered {code}") from None
        raise ConfigError(f"{where}: S3 answered {code} ({status})") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise ConfigError("no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile") from None
    except EndpointConnectionError:
        raise TransientError(f"{where}: S3 endpoint unreachable (IRLIVE_S3_ENDPOINT_URL)") from None
    except BotoCoreError as exc:
        raise TransientError(f"{where}: S3 client error {type(exc).__name__}") from None


def _head_of(key: str, answer: Answer) -> tuple[ObjectInfo, bytes]:
    """ObjectInfo and first bytes from a ranged GET's answer; an S3 error raised as botocore's ClientError."""
    headers, data = answer.headers, answer.body
    if answer.status not in (200, 206):
        code = _xml_field(data, "Code") or str(answer.status)
        if code in ("InvalidRange", "416") or answer.status == 416:
            # Only an empty object cannot satisfy a range that starts at 0.
            return ObjectInfo(key, 0, _etag(headers.get("etag") or _xml_field(data, "ETag") or "")), b""
        raise ClientError({"Error": {"Code": code, "Message": _xml_field(data, "Message") or ""},
                           "ResponseMetadata": {"HTTPStatusCode": answer.status}}, "GetObject")
    total = str(headers.get("content-range", "")).rpartition("/")[2]
    size = int(total) if total.isdigit() else int(headers.get("content-length") or len(data))
    version = headers.get("x-amz-version-id")
    # "null" is what a bucket whose versioning was never enabled (or is suspended) reports.
    info = ObjectInfo(key, size, _etag(headers.get("etag", "")), version if version and version != "null" else None)
    return info, data


def _read_up_to(response: AWSResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body; the connection goes back to the pool only if nothing is left unread."""
    raw = response.raw
    try:
        data: bytes = raw.read(limit)
    finally:
        if raw.tell() >= int(response.headers.get("Content-Length") or 0):
            raw.release_conn()
        else:
            # A server that ignored the range sends the whole object: drop the connection rather than read it.
            raw.close()
    return data


def _xml_field(body: bytes, name: str) -> str | None:
    found = re.search(_XML_FIELD.format(name).encode(), body)
    return found.group(1).decode("utf-8", "replace") if found else None


def _listing(body: bytes) -> tuple[list[tuple[str, str]], str | None] | None:
    """A ListObjectsV2 answer's (key, ETag) pairs and next page's token; None if it is not one read whole."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    if root.tag != f"{_S3_XML}ListBucketResult":
        return None
    encoded = root.findtext(f"{_S3_XML}EncodingType") == "url"
    contents = []
    for obj in root.iterfind(f"{_S3_XML}Contents"):
        key, etag = obj.findtext(f"{_S3_XML}Key"), obj.findtext(f"{_S3_XML}ETag")
        if key is None or etag is None:
            return None
        contents.append((unquote_plus(key) if encoded else key, _etag(etag)))
    truncated = root.findtext(f"{_S3_XML}IsTruncated") == "true"
    following = root.findtext(f"{_S3_XML}NextContinuationToken") if truncated else None
    if truncated and not following:
        return None
    return contents, following


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        when: datetime = DEFAULT_TIMESTAMP_PARSER(text)
        return when


def _frozen(session: boto3.session.Session) -> Any:
    credentials = session.get_credentials()
    if credentials is None:
        raise NoCredentialsError()
    return credentials.get_frozen_credentials()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _etag(raw: str) -> str:
    return raw.strip('"')
