"""Where a scan's objects come from: an S3 prefix (in parallel), an S3 Inventory, or a CSV/JSONL/URL list file."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import queue
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar, cast
from urllib.parse import unquote_plus, urlsplit

from worker.config import S3Location, is_bucket_name
from worker.errors import ConfigError, NotFound
from worker.seams.storage import ObjectInfo, Storage

# Levels of "/" folders explored to find enough sub-prefixes for the listing threads (date partitions
# such as 2026/11/29/ are three deep).
MAX_SPLIT_DEPTH = 4
# Pages (of up to 1000 objects) waiting between the listing threads and the scan: the memory bound.
PAGES_PER_WORKER = 2
PAGE = 1000
# How often a thread blocked on a full queue looks whether its consumer has gone (a poll, not a sleep).
PUT_POLL_S = 0.2
# Line numbers of bad rows kept to report (the count is always complete).
BAD_LINES_KEPT = 10
# Parquet inventory rows decoded at a time (the data file itself waits in a temporary file, not in memory).
PARQUET_BATCH = 1000
# Bytes of a Parquet data file copied to its temporary file at a time.
COPY_CHUNK = 256 * 1024
# The Parquet columns read, each with the CSV fileSchema name it stands for (AWS writes them in snake case).
PARQUET_COLUMNS = {"bucket": "Bucket", "key": "Key", "version_id": "VersionId", "is_latest": "IsLatest",
                   "is_delete_marker": "IsDeleteMarker", "size": "Size", "last_modified_date": "LastModifiedDate",
                   "e_tag": "ETag"}


T = TypeVar("T")


@dataclass(frozen=True)
class Listed:
    """One object a source names: its bucket and what is known of it (an empty ETag: not known)."""

    bucket: str
    info: ObjectInfo


@dataclass
class Source:
    """A parsed scan source; `rows` streams its objects, `bad_rows` counts the rows it had to skip."""

    kind: str
    # The normalised source string: what the run records and what a watermark is kept under.
    name: str
    has_last_modified: bool = True
    bad_rows: int = 0
    bad_lines: list[int] = field(default_factory=list)

    def rows(self, storage: Storage) -> Iterator[Listed]:
        raise NotImplementedError

    def check(self, storage: Storage) -> None:
        """Fail clearly before a run exists when the source cannot be read at all."""

    def bad(self, line: int) -> None:
        self.bad_rows += 1
        if len(self.bad_lines) < BAD_LINES_KEPT:
            self.bad_lines.append(line)

    def bad_summary(self) -> str | None:
        if not self.bad_rows:
            return None
        more = ", …" if self.bad_rows > len(self.bad_lines) else ""
        return (f"{self.bad_rows} rows of {self.name} skipped as unreadable (line "
                f"{', '.join(map(str, self.bad_lines))}{more})")


def parse_source(text: str, list_workers: int = 1) -> Source:
    """s3://bucket/prefix, inventory://bucket/path/manifest.json, file:PATH (.csv, .jsonl, s3:// lines) or file:-."""
    value = text.strip()
    if value.startswith("s3://"):
        return S3Source(S3Location.parse(value, "source"), list_workers)
    if value.startswith("inventory://"):
        parts = urlsplit(value)
        key = parts.path.lstrip("/")
        if not parts.netloc or not key.endswith(".json"):
            raise ConfigError(f"source {text!r}: expected inventory://BUCKET/path/to/manifest.json")
        return InventorySource(parts.netloc, key)
    if value.startswith("file:"):
        path = value.removeprefix("file:")
        path = path.removeprefix("//") if path.startswith("///") else path
        if not path:
            raise ConfigError("source 'file:': give a path (file:keys.csv) or file:- for standard input")
        return FileSource(path)
    raise ConfigError(f"source {text!r}: expected s3://bucket/prefix, inventory://bucket/.../manifest.json, "
                      "file:PATH (.csv, .jsonl or s3:// lines) or file:- (standard input)")


class S3Source(Source):
    """A prefix listed with ListObjectsV2; split on "/" folders across threads when list_workers > 1."""

    def __init__(self, location: S3Location, list_workers: int = 1) -> None:
        super().__init__("s3", str(location))
        self.location = location
        self.list_workers = list_workers

    @property
    def bucket(self) -> str:
        return self.location.bucket

    @property
    def prefix(self) -> str:
        return self.location.prefix + "/" if self.location.prefix else ""

    def check(self, storage: Storage) -> None:
        storage.check_bucket(self.bucket)

    def rows(self, storage: Storage) -> Iterator[Listed]:
        if self.list_workers <= 1:
            return (Listed(self.bucket, o) for o in storage.iter_objects(self.bucket, self.prefix))
        return self._parallel(storage)

    def _parallel(self, storage: Storage) -> Iterator[Listed]:
        """Objects directly in each explored level first, then whole sub-prefixes listed by a thread pool.

        Unordered across sub-prefixes (ordered within one): neither the done-set nor chunking needs order, and
        waiting for the slowest prefix would serialise the listing again. At most PAGES_PER_WORKER pages per
        thread wait in the queue, so memory does not grow with the bucket."""
        frontier = [self.prefix]
        for _ in range(MAX_SPLIT_DEPTH):
            if len(frontier) >= self.list_workers:
                break
            deeper: list[str] = []
            for prefix in frontier:
                for entry in storage.iter_level(self.bucket, prefix):
                    if isinstance(entry, str):
                        deeper.append(entry)
                    else:
                        yield Listed(self.bucket, entry)
            frontier = deeper
            if not frontier:
                return
        yield from self._pool(storage, frontier)

    def _pool(self, storage: Storage, prefixes: list[str]) -> Iterator[Listed]:
        pages: queue.Queue[list[ObjectInfo] | BaseException | None] = queue.Queue(
            maxsize=self.list_workers * PAGES_PER_WORKER)
        stop = threading.Event()

        def put(item: list[ObjectInfo] | BaseException | None) -> bool:
            # A consumer that stopped early (--limit) must not leave threads blocked on a full queue.
            while not stop.is_set():
                try:
                    pages.put(item, timeout=PUT_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        def list_one(prefix: str) -> None:
            page: list[ObjectInfo] = []
            try:
                for obj in storage.iter_objects(self.bucket, prefix):
                    page.append(obj)
                    if len(page) >= PAGE:
                        if not put(page):
                            return
                        page = []
                if page and not put(page):
                    return
                put(None)
            except BaseException as exc:  # handed to the consumer, which raises it in the scan's thread
                put(exc)

        pool = ThreadPoolExecutor(max_workers=self.list_workers, thread_name_prefix="irlive-list")
        try:
            for prefix in prefixes:
                pool.submit(list_one, prefix)
            remaining = len(prefixes)
            while remaining:
                item = pages.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    for obj in item:
                        yield Listed(self.bucket, obj)
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)


def ahead(items: Iterator[T], depth: int, name: str = "irlive-list-ahead") -> Iterator[T]:
    """`items`, produced by a thread that runs at most `depth` items ahead of the consumer.

    The scan lists (S3 round trips, XML parsing) while it deduplicates and enqueues what was listed before; the
    bounded queue keeps memory flat however long the listing. An exception in the thread is raised to the
    consumer, as it is, after every item produced before it (so what was listed is enqueued first, as in a
    scan without the thread). A consumer that stops early stops the thread and closes `items`."""
    if depth < 1:
        raise ValueError("depth must be at least 1")
    box: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: object) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=PUT_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            put(_Failed(exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            entry = box.get()
            if entry is _END:
                return
            if isinstance(entry, _Failed):
                raise entry.exc
            yield cast(T, entry)
    finally:
        stop.set()


_END = object()


@dataclass(frozen=True)
class _Failed:
    """What a read-ahead thread hands over instead of an item when its iterator raised."""

    exc: BaseException


class InventorySource(Source):
    """An S3 Inventory report: manifest.json naming gzip CSV files (streamed row by row) or Parquet files (each
    downloaded to a temporary file, then read in batches of PARQUET_BATCH rows; needs pyarrow)."""

    def __init__(self, bucket: str, manifest_key: str) -> None:
        super().__init__("inventory", f"inventory://{bucket}/{manifest_key}")
        self.bucket = bucket
        self.manifest_key = manifest_key
        self._manifest: dict[str, Any] | None = None

    def manifest(self, storage: Storage) -> dict[str, Any]:
        if self._manifest is None:
            try:
                doc, _ = storage.get_json(self.bucket, self.manifest_key)
            except NotFound:
                raise ConfigError(f"{self.name}: no inventory manifest there") from None
            except ValueError:
                raise ConfigError(f"{self.name}: the manifest is not JSON") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
                raise ConfigError(f"{self.name}: not an S3 Inventory manifest (no 'files' list)")
            self._manifest = doc
        return self._manifest

    def check(self, storage: Storage) -> None:
        storage.check_bucket(self.bucket)
        doc = self.manifest(storage)
        fmt = self._format(doc)
        if fmt == "PARQUET":
            _parquet(self.name)
        if "Key" not in _schema(doc, self.name):
            raise ConfigError(f"{self.name}: the inventory's fileSchema has no Key column")

    def _format(self, doc: dict[str, Any]) -> str:
        fmt = str(doc.get("fileFormat", "CSV")).upper()
        if fmt not in ("CSV", "PARQUET"):
            raise ConfigError(f"{self.name}: inventory format {fmt} is not supported; configure it as CSV or Parquet")
        return fmt

    def rows(self, storage: Storage) -> Iterator[Listed]:
        doc = self.manifest(storage)
        columns = _schema(doc, self.name)
        default_bucket = str(doc.get("sourceBucket", ""))
        self.has_last_modified = "LastModifiedDate" in columns
        if self._format(doc) == "PARQUET":
            yield from self._parquet_rows(storage, doc, default_bucket)
            return
        line = 0
        for entry in doc["files"]:
            body = storage.open_stream(self.bucket, str(entry["key"]))
            try:
                text = io.TextIOWrapper(gzip.GzipFile(fileobj=body), encoding="utf-8", newline="")
                for row in csv.reader(text):
                    line += 1
                    listed = _inventory_row(dict(zip(columns, row, strict=False)), default_bucket)
                    if listed is None:
                        self.bad(line)
                    elif listed.info.key:
                        yield listed
            except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
                raise ConfigError(f"{self.name}: data file {entry['key']} is not a gzip CSV ({exc})") from None
            finally:
                body.close()

    def _parquet_rows(self, storage: Storage, doc: dict[str, Any], default_bucket: str) -> Iterator[Listed]:
        """pyarrow needs a seekable file: each data file is copied (in pieces) to a temporary file, which is
        deleted once read. Keys are not URL-encoded in Parquet (only CSV encodes them)."""
        pq = _parquet(self.name)
        int64 = importlib.import_module("pyarrow").int64()
        line = 0
        for entry in doc["files"]:
            with tempfile.TemporaryFile(prefix="irlive-inventory-", suffix=".parquet") as local:
                body = storage.open_stream(self.bucket, str(entry["key"]))
                try:
                    shutil.copyfileobj(body, local, COPY_CHUNK)
                finally:
                    body.close()
                local.seek(0)
                try:
                    data = pq.ParquetFile(local)
                    present = set(data.schema_arrow.names)
                    wanted = [c for c in PARQUET_COLUMNS if c in present]
                    batches = data.iter_batches(batch_size=PARQUET_BATCH, columns=wanted)
                    for batch in batches:
                        columns = {name: _column(column, int64) for name, column in
                                   zip(batch.schema.names, batch.columns, strict=True)}
                        for i in range(batch.num_rows):
                            line += 1
                            listed = _parquet_row({name: values[i] for name, values in columns.items()},
                                                  default_bucket)
                            if listed is None:
                                self.bad(line)
                            elif listed.info.key:
                                yield listed
                except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid and ArrowIOError are these
                    raise ConfigError(f"{self.name}: data file {entry['key']} is not a Parquet file ({exc})") from None


def _parquet(name: str) -> Any:
    """pyarrow.parquet, imported only when a Parquet inventory is read (pyarrow is optional: `.[parquet]`)."""
    if importlib.util.find_spec("pyarrow") is None:
        raise ConfigError(f"{name}: Parquet inventories need pyarrow (pip install 'irlive[parquet]' or "
                          "pip install pyarrow), or configure the inventory as CSV")
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError as exc:
        raise ConfigError(f"{name}: Parquet inventories need pyarrow, which does not import ({exc})") from None


_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def _column(column: Any, int64: Any) -> list[Any]:
    """A batch's column as Python values; timestamps (stored as UTC instants) as aware datetimes, converted from
    their integers: several times faster than pyarrow's own conversion of a time-zoned column."""
    kind = column.type
    if not str(kind).startswith("timestamp"):
        return list(column.to_pylist())
    per_second = _PER_SECOND[kind.unit]
    return [None if n is None else _instant(n, per_second) for n in column.cast(int64).to_pylist()]


def _instant(n: int, per_second: int) -> datetime | str:
    try:
        return datetime.fromtimestamp(n / per_second, UTC)
    except (OverflowError, ValueError, OSError):
        return "unreadable"  # out of datetime's range: the row is counted bad, as an unreadable CSV date is


def _parquet_row(values: dict[str, Any], default_bucket: str) -> Listed | None:
    """One Parquet inventory row (snake-case columns, typed values; the key as it is: Parquet does not URL-encode
    it); None when unreadable; an empty key for delete markers and older versions, as for CSV rows."""
    key, bucket = values.get("key") or "", values.get("bucket") or default_bucket
    if not isinstance(key, str) or not key or not isinstance(bucket, str) or not bucket:
        return None
    if values.get("is_delete_marker") is True or values.get("is_latest") is False:
        return Listed(bucket, ObjectInfo("", 0, ""))
    modified = values.get("last_modified_date")
    try:
        size = int(values.get("size") or 0)
        if isinstance(modified, int):  # an int64 column without its TIMESTAMP_MILLIS annotation
            modified = datetime.fromtimestamp(modified / 1000, UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
    if modified is not None and not isinstance(modified, datetime):
        return None
    if modified is not None and modified.tzinfo is None:
        modified = modified.replace(tzinfo=UTC)
    return Listed(bucket, ObjectInfo(key, size, str(values.get("e_tag") or "").strip('"'),
                                     values.get("version_id") or None, modified))


def _schema(doc: dict[str, Any], name: str) -> list[str]:
    """The manifest's column names in CSV terms: a CSV list (Bucket, Key, ...) or, for Parquet, the message
    schema AWS writes (message s3.inventory { required binary key (UTF8); ... }) with its snake names mapped."""
    schema = doc.get("fileSchema")
    if not isinstance(schema, str) or not schema.strip():
        raise ConfigError(f"{name}: the manifest has no fileSchema")
    if schema.lstrip().startswith("message"):
        fields = re.findall(r"(?:required|optional|repeated)\s+\w+\s+(\w+)", schema)
        return [PARQUET_COLUMNS.get(f, f) for f in fields]
    return [c.strip() for c in schema.split(",")]


def _inventory_row(row: dict[str, str], default_bucket: str) -> Listed | None:
    """One inventory row; None when unreadable; a Listed with an empty key for rows to pass over silently
    (delete markers, older versions: they are not images to judge)."""
    key = unquote_plus(row.get("Key", ""))
    bucket = row.get("Bucket") or default_bucket
    if not key or not bucket:
        return None
    if row.get("IsDeleteMarker", "").lower() == "true" or row.get("IsLatest", "true").lower() == "false":
        return Listed(bucket, ObjectInfo("", 0, ""))
    try:
        size = int(row["Size"]) if row.get("Size") else 0
        modified = _when(row["LastModifiedDate"]) if row.get("LastModifiedDate") else None
    except ValueError:
        return None
    return Listed(bucket, ObjectInfo(key, size, row.get("ETag", "").strip('"'), row.get("VersionId") or None,
                                     modified))


def _when(text: str) -> datetime:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


class FileSource(Source):
    """A list file (or stdin): per line a CSV row bucket,key[,etag], a JSON object, or an s3://bucket/key URL."""

    def __init__(self, path: str) -> None:
        super().__init__("file", "file:-" if path == "-" else f"file:{Path(path).resolve()}", has_last_modified=False)
        self.path = path

    def check(self, storage: Storage) -> None:
        if self.path != "-" and not Path(self.path).is_file():
            raise ConfigError(f"source file:{self.path}: no such file")

    def rows(self, storage: Storage) -> Iterator[Listed]:
        if self.path == "-":
            yield from self._read(sys.stdin)
            return
        try:
            with open(self.path, encoding="utf-8", newline="") as handle:
                yield from self._read(handle)
        except OSError as exc:
            raise ConfigError(f"source file:{self.path}: cannot read it ({exc.strerror})") from None

    def _read(self, handle: IO[str]) -> Iterator[Listed]:
        # Keys are taken literally: S3 keys may hold spaces at either end, "#", "?" and a leading "/", and a key
        # read otherwise names another object (or none) and that image is lost without a word. Only the line
        # ending is dropped; a row that cannot be read whole is counted bad with its line number.
        columns = ["bucket", "key", "etag"]
        for line, raw in enumerate(handle, start=1):
            text = raw.rstrip("\r\n")
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.startswith("{"):
                listed = _json_row(stripped)
            elif text.startswith("s3://"):
                listed = _url_row(text)
            else:
                fields = next(csv.reader([text]), [])
                lowered = [f.strip().lower() for f in fields]
                if "key" in lowered and "bucket" in lowered:
                    columns = lowered  # a header: names the columns of the rows below
                    continue
                listed = _csv_row(dict(zip(columns, fields, strict=False)))
            if listed is None:
                self.bad(line)
            else:
                yield listed


def _json_row(text: str) -> Listed | None:
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    return _csv_row({k: str(v) for k, v in doc.items() if v is not None})


def _url_row(text: str) -> Listed | None:
    """s3://bucket/key, the key being everything after the bucket's "/" as written (no URL parsing)."""
    bucket, slash, key = text.removeprefix("s3://").partition("/")
    return Listed(bucket, ObjectInfo(key, 0, "")) if slash and key and is_bucket_name(bucket) else None


def _csv_row(row: dict[str, str]) -> Listed | None:
    bucket, key = row.get("bucket", "").strip(), row.get("key", "")
    if not is_bucket_name(bucket) or not key:
        return None
    return Listed(bucket, ObjectInfo(key, 0, row.get("etag", "").strip().strip('"')))
