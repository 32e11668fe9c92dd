"""Scan sources: parsing, list files, S3 Inventory, parallel listing, --since/--until times, watermarks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from bench.inventory_memory import PARQUET_SCHEMA, write_inventory
from producer.filters import modified_between, parse_time
from producer.scan import per_bucket, watermark_name
from producer.sources import FileSource, InventorySource, Listed, S3Source, parse_source
from sandbox.images import png
from sandbox.stack import AWS_ENV, Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run
from worker.config import S3Location
from worker.errors import ConfigError
from worker.flow.claims import Claims, DoneEntry
from worker.flow.runs import Runs
from worker.flow.watermarks import Watermarks
from worker.keys import Keys
from worker.seams.storage import ObjectInfo, Storage
from worker.seams.store import Store

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def _storage(stack: Stack) -> Storage:
    return Storage(stack.s3_endpoint, credentials=(AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"]))


# ---- parsing ---------------------------------------------------------------------------------------------

def test_every_source_kind_parses_and_a_wrong_one_says_what_is_expected() -> None:
    assert isinstance(parse_source("s3://bucket/a/b"), S3Source)
    inv = parse_source("inventory://inv-bucket/x/irlive/2026-11-30T00-00Z/manifest.json")
    assert isinstance(inv, InventorySource) and inv.bucket == "inv-bucket"
    assert isinstance(parse_source("file:keys.csv"), FileSource)
    assert parse_source("file:-").name == "file:-"
    for bad in ("gs://bucket/x", "inventory://bucket/not-a-manifest", "file:", "bucket/prefix"):
        with pytest.raises(ConfigError, match=r"expected|give a path"):
            parse_source(bad)


def test_times_are_iso_dates_or_spans_back_from_now_and_bad_ones_are_named() -> None:
    assert parse_time("2026-11-29", NOW) == datetime(2026, 11, 29, tzinfo=UTC)
    assert parse_time("2026-11-29T10:00:00Z", NOW) == datetime(2026, 11, 29, 10, tzinfo=UTC)
    assert parse_time("2026-11-29T12:00:00+02:00", NOW) == datetime(2026, 11, 29, 10, tzinfo=UTC)
    assert parse_time("24h", NOW) == NOW - timedelta(hours=24)
    assert parse_time("90m", NOW) == NOW - timedelta(minutes=90)
    assert parse_time("7d", NOW) == NOW - timedelta(days=7)
    for bad in ("yesterday", "24x", "2026-13-01", ""):
        with pytest.raises(ConfigError, match="--since"):
            parse_time(bad, NOW)


def test_the_window_keeps_since_inclusive_until_exclusive_and_rows_without_a_time() -> None:
    lower, upper = NOW - timedelta(hours=1), NOW
    assert modified_between(lower, lower, upper)
    assert not modified_between(upper, lower, upper)
    assert not modified_between(lower - timedelta(seconds=1), lower, upper)
    assert modified_between(None, lower, upper)


def test_a_narrower_suffix_filter_keeps_its_own_watermark() -> None:
    s3 = parse_source("s3://bucket/captures/")
    assert watermark_name(s3, (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")) == "s3://bucket/captures"
    assert watermark_name(s3, (".png",)) == "s3://bucket/captures?suffix=.png"
    assert watermark_name(parse_source("file:x.csv"), (".png",)) is None


def test_chunks_hold_one_bucket_each() -> None:
    rows = [Listed("a" if i % 3 else "b", ObjectInfo(f"k{i}.png", 1, "e")) for i in range(10)]
    chunks = list(per_bucket(iter(rows), 3))
    assert all(len({b}) == 1 for b, _ in chunks)
    assert sorted(o.key for _, c in chunks for o in c) == sorted(r.info.key for r in rows)
    assert all(len(c) <= 3 for _, c in chunks)
    assert {b for b, _ in chunks} == {"a", "b"}


# ---- list files ------------------------------------------------------------------------------------------

def _read(text: str) -> tuple[list[Listed], FileSource]:
    source = FileSource("-")
    return list(source._read(io.StringIO(text))), source


def test_csv_rows_with_or_without_a_header_and_an_optional_etag() -> None:
    rows, source = _read("bucket,key,etag\nbk1,a/1.png,abc\nbk1,a/2.png\n\"bk2\",\"a/3 x.png\",\"def\"\n")
    assert [(r.bucket, r.info.key, r.info.etag) for r in rows] == [
        ("bk1", "a/1.png", "abc"), ("bk1", "a/2.png", ""), ("bk2", "a/3 x.png", "def")]
    assert source.bad_rows == 0
    rows, _ = _read("key,bucket\na/1.png,bk1\n")
    assert [(r.bucket, r.info.key) for r in rows] == [("bk1", "a/1.png")], "the header names the column order"


def test_jsonl_and_url_lines_and_bad_rows_are_counted_with_their_line_numbers() -> None:
    text = ('{"bucket": "bk1", "key": "a/1.png", "etag": "e1"}\n'
            "s3://bk2/deep/2.png\n"
            '{"bucket": "bk1", "key": \n'           # line 3: bad JSON
            '{"key": "no-bucket.png"}\n'           # line 4: no bucket
            "\n# a comment\n"
            "s3://only-a-bucket\n"                 # line 7: no key
            '{"bucket": "bk1", "key": "a/9.png"}\n')
    rows, source = _read(text)
    assert [(r.bucket, r.info.key, r.info.etag) for r in rows] == [
        ("bk1", "a/1.png", "e1"), ("bk2", "deep/2.png", ""), ("bk1", "a/9.png", "")]
    assert source.bad_rows == 3 and source.bad_lines == [3, 4, 7]
    summary = source.bad_summary()
    assert summary is not None and "3 rows" in summary and "3, 4, 7" in summary


# ---- through S3 (moto_server) ----------------------------------------------------------------------------

def test_parallel_listing_finds_exactly_what_one_paginator_finds(clean_stack: Stack) -> None:
    s3 = clean_stack.s3_client()
    keys = [f"p/top_{i}.png" for i in range(3)]  # directly under the prefix: must not be lost by the split
    keys += [f"p/2026/11/{d:02d}/img_{i}.png" for d in range(1, 13) for i in range(7)]
    keys += ["p/2026/loose.png", "p/other/x.png", "pother/not-under-p.png"]
    for key in keys:
        s3.put_object(Bucket=IN_BUCKET, Key=key, Body=b"x")
    storage = _storage(clean_stack)
    plain = S3Source(S3Location(IN_BUCKET, "p"), list_workers=1)
    parallel = S3Source(S3Location(IN_BUCKET, "p"), list_workers=8)
    one = sorted(r.info.key for r in plain.rows(storage))
    many = [r.info.key for r in parallel.rows(storage)]
    assert one == sorted(k for k in keys if k.startswith("p/"))
    assert sorted(many) == one and len(many) == len(set(many))
    # A consumer that stops early (--limit) leaves no thread blocked: the generator closes cleanly.
    rows = parallel.rows(storage)
    assert len([next(rows) for _ in range(5)]) == 5
    rows.close()  # type: ignore[attr-defined]


def test_an_inventory_is_read_row_by_row_with_url_encoded_keys(clean_stack: Stack) -> None:
    s3 = clean_stack.s3_client()
    s3.create_bucket(Bucket="inv-dest")
    rows = [(IN_BUCKET, f"cap/day {i}/ü+{i}.png", 10 + i, f"{i:032x}") for i in range(2500)]
    manifest = write_inventory(s3, "inv-dest", IN_BUCKET, rows, rows_per_file=1000)
    source = parse_source(f"inventory://inv-dest/{manifest}")
    storage = _storage(clean_stack)
    source.check(storage)
    got = list(source.rows(storage))
    assert [(r.bucket, r.info.key, r.info.size, r.info.etag) for r in got] == rows
    assert all(r.info.last_modified is not None for r in got)
    assert source.bad_rows == 0


def test_an_inventory_that_is_not_one_fails_clearly(clean_stack: Stack) -> None:
    s3 = clean_stack.s3_client()
    storage = _storage(clean_stack)
    s3.put_object(Bucket=IN_BUCKET, Key="inv/manifest.json",
                  Body=json.dumps({"fileFormat": "ORC", "fileSchema": "struct<bucket:string,key:string>",
                                   "files": []}).encode())
    with pytest.raises(ConfigError, match="format ORC is not supported; configure it as CSV or Parquet"):
        parse_source(f"inventory://{IN_BUCKET}/inv/manifest.json").check(storage)
    with pytest.raises(ConfigError, match="no inventory manifest"):
        parse_source(f"inventory://{IN_BUCKET}/nothing/manifest.json").check(storage)
    s3.put_object(Bucket=IN_BUCKET, Key="inv/broken/data/x.parquet", Body=b"not parquet at all")
    s3.put_object(Bucket=IN_BUCKET, Key="inv/broken/manifest.json",
                  Body=json.dumps({"fileFormat": "Parquet", "fileSchema": PARQUET_SCHEMA,
                                   "files": [{"key": "inv/broken/data/x.parquet"}]}).encode())
    with pytest.raises(ConfigError, match=r"data file inv/broken/data/x.parquet is not a Parquet file"):
        list(parse_source(f"inventory://{IN_BUCKET}/inv/broken/manifest.json").rows(storage))


# Keys a Parquet inventory holds as they are (only CSV URL-encodes them): "%20" and "+" must survive literally.
PARQUET_KEYS = [f"pq/day {i % 7}/ü+é {i}%20x.png" if i % 10 == 0 else f"pq/d{i % 7}/img_{i:05d}.png"
                for i in range(2500)]


def test_a_parquet_inventory_is_read_in_batches_with_its_keys_as_they_are(clean_stack: Stack) -> None:
    import pyarrow as pa  # the `parquet` extra, in `dev`
    import pyarrow.parquet as pq

    s3 = clean_stack.s3_client()
    s3.create_bucket(Bucket="inv-dest")
    rows = [(IN_BUCKET, k, 10 + i, f"{i:032x}") for i, k in enumerate(PARQUET_KEYS)]
    manifest = write_inventory(s3, "inv-dest", IN_BUCKET, rows, rows_per_file=1000, file_format="Parquet")
    # One more data file as a versioned inventory writes it: a delete marker and an older version are passed
    # over, a row without a size or date (optional columns) is kept, a naive timestamp is taken as UTC, a date out
    # of range is a bad row (line 2505).
    eight = int(datetime(2026, 11, 1, 8, tzinfo=UTC).timestamp() * 1000)
    extra = pa.table({"bucket": [IN_BUCKET] * 5,
                      "key": ["pq/gone.png", "pq/old.png", "pq/bare.png", "pq/n.png", "pq/far.png"],
                      "version_id": ["v1", "v2", None, "v4", None], "is_latest": [True, False, True, None, True],
                      "is_delete_marker": [True, False, False, None, False], "size": [None, 5, None, 7, 1],
                      "last_modified_date": pa.array([None, None, None, eight, 10**17], pa.timestamp("ms")),
                      "e_tag": [None, "x", "\"quoted\"", "n", "f"], "storage_class": ["STANDARD"] * 5})
    out = io.BytesIO()
    pq.write_table(extra, out)
    s3.put_object(Bucket="inv-dest", Key="inv/extra.parquet", Body=out.getvalue())
    doc = json.loads(s3.get_object(Bucket="inv-dest", Key=manifest)["Body"].read())
    doc["files"].append({"key": "inv/extra.parquet", "size": len(out.getvalue()), "MD5checksum": "0" * 32})
    s3.put_object(Bucket="inv-dest", Key=manifest, Body=json.dumps(doc).encode())

    source = parse_source(f"inventory://inv-dest/{manifest}")
    storage = _storage(clean_stack)
    source.check(storage)
    got = list(source.rows(storage))
    assert [(r.bucket, r.info.key, r.info.size, r.info.etag) for r in got[:-2]] == rows
    assert all(r.info.last_modified is not None for r in got[:-2]) and source.has_last_modified
    bare, naive = got[-2:]
    assert (bare.info.key, bare.info.size, bare.info.etag, bare.info.last_modified) == ("pq/bare.png", 0, "quoted",
                                                                                         None)
    assert (naive.info.key, naive.info.version_id, naive.info.last_modified) == (
        "pq/n.png", "v4", datetime(2026, 11, 1, 8, tzinfo=UTC))
    assert (source.bad_rows, source.bad_lines) == (1, [2505])


def test_a_parquet_inventory_drives_a_dry_run_and_meets_the_done_set(clean_stack: Stack,
                                                                    irlive: IrliveRunner) -> None:
    s3 = clean_stack.s3_client()
    s3.create_bucket(Bucket="inv-dest")
    keys = PARQUET_KEYS[:300]
    rows = [(IN_BUCKET, k, 1, f"{i:032x}") for i, k in enumerate(keys)]
    rows += [(IN_BUCKET, f"pq/notes {i}.txt", 1, "t") for i in range(20)]  # filtered by suffix
    manifest = write_inventory(s3, "inv-dest", IN_BUCKET, rows, rows_per_file=128, file_format="Parquet")
    judged = [(f"{IN_BUCKET}/{k}@{i:032x}", DoneEntry("live", 1, "earlier-run", 0)) for i, k in enumerate(keys)
              if i % 3 == 0]
    assert any(" " in i and "%20" in i and "ü" in i for i, _ in judged), "the odd keys are among the judged"
    Claims(Store.from_url(clean_stack.redis_url), Keys()).restore_judged(judged)

    done = irlive("scan", f"inventory://inv-dest/{manifest}", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["found"], doc["already_judged"], doc["to_judge"]) == (300, 100, 200), doc
    assert not doc["warnings"], doc["warnings"]


def test_without_pyarrow_a_parquet_inventory_is_refused_clearly(clean_stack: Stack,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = clean_stack.s3_client()
    s3.create_bucket(Bucket="inv-dest")
    manifest = write_inventory(s3, "inv-dest", IN_BUCKET, [(IN_BUCKET, "a.png", 1, "e")], file_format="Parquet")
    source = parse_source(f"inventory://inv-dest/{manifest}")
    storage = _storage(clean_stack)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what an environment without pyarrow imports
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    for attempt in (lambda: source.check(storage), lambda: list(source.rows(storage))):
        with pytest.raises(ConfigError, match=r"Parquet inventories need pyarrow \(pip install 'irlive\[parquet\]'"):
            attempt()
    # The CLI imports no pyarrow until a Parquet inventory is read: it starts (and reads CSV) without it.
    started = subprocess.run([sys.executable, "-c", "import sys, producer.cli, producer.sources; "
                              "print('pyarrow' in sys.modules)"], capture_output=True, text=True, check=True,
                             timeout=60)
    assert started.stdout.strip() == "False"


def test_file_sources_dry_run_counts(clean_stack: Stack, irlive: IrliveRunner, tmp_path: Path) -> None:
    s3 = clean_stack.s3_client()
    for i in range(6):
        s3.put_object(Bucket=IN_BUCKET, Key=f"f/{i}.png", Body=b"x")
    csv_file = tmp_path / "keys.csv"
    csv_file.write_text("bucket,key\n" + "".join(f"{IN_BUCKET},f/{i}.png\n" for i in range(5)) + f"{IN_BUCKET}\n"
                        f"{IN_BUCKET},f/readme.txt\n")
    jsonl = tmp_path / "keys.jsonl"
    jsonl.write_text("".join(json.dumps({"bucket": IN_BUCKET, "key": f"f/{i}.png"}) + "\n" for i in range(4)))

    def dry(source: str, stdin: str | None = None) -> dict[str, object]:
        import os
        import subprocess

        from tests.conftest import IRLIVE_BIN

        done = subprocess.run([str(IRLIVE_BIN), "scan", source, "--dry-run", "--json"], input=stdin,
                              env={**os.environ, **clean_stack.env}, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stderr
        doc: dict[str, object] = json.loads(done.stdout)
        return doc

    by_csv = dry(f"file:{csv_file}")
    assert (by_csv["found"], by_csv["to_judge"]) == (5, 5), "the .txt row is filtered by suffix"
    assert any("1 rows" in str(w) and "line 7" in str(w) for w in by_csv["warnings"]), by_csv["warnings"]  # type: ignore[attr-defined]
    assert dry(f"file:{jsonl}")["found"] == 4
    assert dry("file:-", stdin="".join(f"s3://{IN_BUCKET}/f/{i}.png\n" for i in range(6)))["found"] == 6
    missing = irlive("scan", "file:/no/such/list.csv", "--dry-run")
    assert missing.returncode == 2 and "no such file" in missing.stderr
    since = irlive("scan", f"file:{csv_file}", "--since", "24h", "--dry-run")
    assert since.returncode == 2 and "LastModified" in since.stderr


# ---- watermarks (fakeredis runs the real Lua) ------------------------------------------------------------

def _marks() -> Watermarks:
    return Watermarks(Store(fakeredis.FakeRedis(decode_responses=True)), Keys())


def test_a_watermark_only_moves_forward() -> None:
    marks = _marks()
    assert marks.get("s3://b/p") is None
    assert marks.advance("s3://b/p", "2026-11-30T10:00:00+00:00")
    assert not marks.advance("s3://b/p", "2026-11-30T09:00:00Z"), "a run ending late must not move it back"
    assert marks.advance("s3://b/p", "2026-11-30T11:00:00Z")
    assert marks.get("s3://b/p") == datetime(2026, 11, 30, 11, tzinfo=UTC)
    assert marks.get("s3://b/other") is None


def test_one_active_run_holds_a_source_and_an_ended_one_is_replaced() -> None:
    marks = _marks()
    active = {"run-1"}
    assert marks.claim("s3://b/p", "run-1", active.__contains__) is None
    assert marks.claim("s3://b/p", "run-2", active.__contains__) == "run-1"
    assert marks.holder("s3://b/p") == "run-1", "a refused claim changes nothing"
    active.clear()  # run-1 ended without letting go (a crash): the next claim takes the source over
    assert marks.claim("s3://b/p", "run-3", active.__contains__) is None
    assert not marks.release("s3://b/p", "run-1"), "a run that lost the source cannot free another's hold"
    assert marks.holder("s3://b/p") == "run-3"
    assert marks.release("s3://b/p", "run-3")
    assert marks.holder("s3://b/p") is None


def test_since_and_until_filter_the_listing_and_bad_values_are_refused(clean_stack: Stack,
                                                                      irlive: IrliveRunner) -> None:
    s3 = clean_stack.s3_client()
    for i in range(4):
        s3.put_object(Bucket=IN_BUCKET, Key=f"w/{i}.png", Body=b"x")

    def found(*args: str) -> int:
        done = irlive("scan", f"s3://{IN_BUCKET}/w", "--dry-run", "--json", *args)
        assert done.returncode == 0, done.stderr
        return int(json.loads(done.stdout)["found"])

    assert found("--since", "1h") == 4
    assert found("--since", "2100-01-01") == 0, "LastModified before --since (less the overlap) is not listed"
    assert found("--until", "2000-01-01") == 0
    assert found("--since", "2000-01-01", "--until", "2100-01-01T00:00:00Z") == 4
    for args, why in ((["--since", "yesterday"], "ISO-8601"), (["--until", "soon"], "--until"),
                      (["--since", "2026-11-30", "--until", "2026-11-29"], "is not before")):
        bad = irlive("scan", f"s3://{IN_BUCKET}/w", *args)
        assert bad.returncode == 2 and why in bad.stderr, bad.stderr


def test_runs_record_the_watermark_finalisation_advances_except_partial_ones(clean_stack: Stack,
                                                                            irlive: IrliveRunner) -> None:
    s3 = clean_stack.s3_client()
    for i in range(2):
        s3.put_object(Bucket=IN_BUCKET, Key=f"m/{i}.png", Body=b"x")
    runs = Runs(Store.from_url(clean_stack.redis_url), Keys())

    def run_of(*args: str) -> dict[str, Any]:
        done = irlive("scan", *args, "--json")
        assert done.returncode == 0, done.stderr
        run = runs.get(json.loads(done.stdout)["run_id"])
        assert run is not None
        return run

    full = run_of(f"s3://{IN_BUCKET}/m", "--until", "2100-01-01")
    assert full["watermark_source"] == f"s3://{IN_BUCKET}/m" and full["watermark_to"] == "2100-01-01T00:00:00+00:00"
    started = datetime.now(UTC)
    plain = run_of(f"s3://{IN_BUCKET}/m/")
    assert abs((datetime.fromisoformat(plain["watermark_to"]) - started).total_seconds()) < 30
    assert run_of(f"s3://{IN_BUCKET}/m", "--suffix", ".png")["watermark_source"] == f"s3://{IN_BUCKET}/m?suffix=.png"
    assert "watermark_source" not in run_of(f"s3://{IN_BUCKET}/m", "--limit", "1"), "a partial listing"


def test_list_file_keys_are_taken_literally() -> None:
    """`#`, `?`, a leading `/` and spaces at either end are part of a key; reading them as URL syntax or trimming
    them named other objects (or none), and the images were lost with `bad_rows: 0`."""
    text = ("s3://cams/shots/photo#1.png\n"
            "s3://cams/what?.png\n"
            "s3://cams//lead/x.png\n"
            "cams, spaced key .png \n"
            "cams,\" quoted, with comma .png\"\n"
            '{"bucket": "cams", "key": " json key "}\n'
            "s3://ca/x.png\n"                      # line 7: no bucket is 2 characters long
            "s3://cams/\n"                         # line 8: no key
            "bad bucket,k.png\n")                  # line 9: not a bucket name
    rows, source = _read(text)
    assert [(r.bucket, r.info.key) for r in rows] == [
        ("cams", "shots/photo#1.png"), ("cams", "what?.png"), ("cams", "/lead/x.png"),
        ("cams", " spaced key .png "), ("cams", " quoted, with comma .png"), ("cams", " json key ")]
    assert source.bad_lines == [7, 8, 9]


@pytest.mark.parametrize(("text", "prefix"), [("s3://cams/shots#2026", "shots#2026"), ("s3://cams/what?/", "what?"),
                                              ("s3://cams", ""), ("s3://cams/a/b/", "a/b")])
def test_an_s3_location_is_read_literally(text: str, prefix: str) -> None:
    assert S3Location.parse(text) == S3Location("cams", prefix)


@pytest.mark.parametrize("text", ["s3://", "s3:///x", "s3://ab/x", "s3://a b/x", "https://cams/x", "s3://ca?s/x"])
def test_an_s3_location_that_names_no_bucket_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        S3Location.parse(text)


def test_a_list_file_of_odd_keys_judges_each_of_those_images(clean_stack: Stack, irlive: IrliveRunner,
                                                             tmp_path: Path) -> None:
    """Through the CLI and real workers: every listed key is the object judged, none lost or swapped."""
    keys = ["odd/photo#1.png", "odd/what?.png", " odd/spaced.png", "/lead/x.png"]
    s3 = clean_stack.s3_client()
    for i, key in enumerate(keys):
        s3.put_object(Bucket=IN_BUCKET, Key=key, Body=png(96, 96, "live", seed=800 + i))
    listing = tmp_path / "odd.txt"
    listing.write_text(f"s3://{IN_BUCKET}/{keys[0]}\ns3://{IN_BUCKET}/{keys[1]}\n{IN_BUCKET},{keys[2]}\n"
                       f"s3://{IN_BUCKET}/{keys[3]}\n")
    clean_stack.start_worker()
    done = irlive("scan", f"file:{listing}", "--wait", "--json", timeout=180)
    assert done.returncode == 0, done.stderr
    started, final = (json.loads(line) for line in done.stdout.splitlines())
    assert (started["found"], started["bad_rows"], final["state"]) == (4, 0, "done")
    records = read_run(clean_stack, started["run_id"]).records
    assert sorted(r["key"] for r in records) == sorted(keys)
    assert all(r["verdict"] == "live" for r in records), records
