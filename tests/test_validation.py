"""Pre-validation of image headers: declared lengths, dimension bounds and far-off JPEG frame headers, refused at $0."""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import cast
from urllib.parse import quote

import pytest
from PIL import Image

from sandbox.images import Sample, jpeg, png
from sandbox.stack import Stack
from sandbox.truth import fallback_truth, truth_verdict
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run, upload
from tests.test_e2e import scan_and_wait
from tests.test_hostile import billed_keys, check_run, good
from worker.errors import NotFound, PermanentInputError
from worker.flow.validate import Limits, validate
from worker.judge.imageinfo import HEAD_BYTES, MAX_MORE_READS, MORE_BYTES, TAIL_BYTES, ImageInfo
from worker.seams.storage import ObjectInfo, Storage

# --- samples ----------------------------------------------------------------------------------------------


def encoded(fmt: str, width: int = 96, height: int = 96, seed: int = 11) -> bytes:
    """A synthetic capture re-encoded by Pillow (no stored truth: the sandbox judges it by the fallback)."""
    picture = Image.open(io.BytesIO(png(width, height, "live", seed=seed))).convert("RGB")
    out = io.BytesIO()
    picture.save(out, fmt)
    return out.getvalue()


def behind_comments(data: bytes, filler: int) -> bytes:
    """The JPEG `data` with `filler` bytes of COM segments right after SOI, pushing its frame header back."""
    segments = []
    while filler > 0:
        n = min(filler, 0xFFFF - 2)
        segments.append(b"\xff\xfe" + struct.pack(">H", n + 2) + b"c" * n)
        filler -= n
    return data[:2] + b"".join(segments) + data[2:]


def png_declaring(width: int, height: int, total: int = 100) -> bytes:
    """A tiny PNG whose IHDR claims `width`x`height`: a decompression bomb's header on almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 16))
    pad = total - len(head) - len(idat) - 12 * 2
    return head + idat + chunk(b"irPd", b"\x00" * pad) + chunk(b"IEND", b"")


def test_the_samples_are_what_they_claim() -> None:
    assert len(png_declaring(65535, 65535)) == 100
    tiny = behind_comments(jpeg(16, 16, "live", seed=1), 100_000)
    assert len(tiny) > 100_000
    with Image.open(io.BytesIO(tiny)) as image:
        assert image.size == (16, 16)
    for fmt in ("WEBP", "BMP"):
        with Image.open(io.BytesIO(encoded(fmt))) as image:
            image.load()
            assert image.size == (96, 96)


# --- validate(), request by request ----------------------------------------------------------------------


class CountingStorage:
    """The two reads validate() uses, over bytes in memory, keeping every request made."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.requests: list[tuple[str, str, str | None]] = []  # (key, range, etag)

    def read_head(self, bucket: str, key: str, max_bytes: int) -> tuple[ObjectInfo, bytes]:
        self.requests.append((key, f"bytes=0-{max_bytes - 1}", None))
        data = self.objects[key]
        return ObjectInfo(key, len(data), etag_of(data)), data[:max_bytes]

    def read_range(self, bucket: str, key: str, byte_range: str, etag: str | None = None) -> bytes:
        self.requests.append((key, byte_range, etag))
        data = self.objects[key]
        if etag != etag_of(data):
            raise NotFound(f"{key} changed")
        first, _, last = byte_range.removeprefix("bytes=").partition("-")
        if not first:
            return data[-int(last) :]
        assert 0 <= int(first) <= int(last) < len(data), f"{byte_range} reaches past the object ({len(data)} bytes)"
        return data[int(first) : int(last) + 1]

    def ranges(self, key: str) -> list[str]:
        return [r for k, r, _ in self.requests if k == key]


def etag_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def check(data: bytes, limits: Limits | None = None) -> tuple[str | None, list[str], ImageInfo | None]:
    """validate() on one object: the error code (None if accepted), the ranges it read, what it found."""
    storage = CountingStorage({"k": data})
    try:
        _info, image = validate(cast(Storage, storage), "b", "k", limits or Limits())
    except PermanentInputError as exc:
        code: str | None = exc.code
        image = None
    else:
        code = None
    assert all(etag == etag_of(data) for _k, r, etag in storage.requests if not r.startswith("bytes=0-")), (
        "every read after the head is pinned to the head's ETag")
    return code, storage.ranges("k"), image


TAIL = f"bytes=-{TAIL_BYTES}"
HEAD = f"bytes=0-{HEAD_BYTES - 1}"


def test_a_normal_small_image_takes_one_request_and_a_large_one_two() -> None:
    small, large = png(96, 96, "live", seed=1), png(96, 96, "live", seed=1, pad_to=300_000)
    big_jpeg = jpeg(900, 900, "live", seed=2)
    assert len(small) < HEAD_BYTES < len(big_jpeg)
    assert check(small)[:2] == (None, [HEAD])
    assert check(large)[:2] == (None, [HEAD, TAIL])
    assert check(big_jpeg)[:2] == (None, [HEAD, TAIL])
    for fmt in ("WEBP", "BMP", "GIF"):
        assert check(encoded(fmt))[:2] == (None, [HEAD]), fmt
    assert check(encoded("BMP", 200, 200))[:2] == (None, [HEAD, TAIL])


def test_a_jpeg_frame_header_past_the_head_is_read_on_demand() -> None:
    data = behind_comments(jpeg(128, 128, "live", seed=3), 100_000)
    code, ranges, image = check(data)
    # The second COM segment starts past the head; reading from it to the end also brings the end marker.
    second = 2 + 0xFFFF + 2
    assert (code, ranges) == (None, [HEAD, f"bytes={second}-{len(data) - 1}"])
    assert image is not None and (image.width, image.height) == (128, 128)


def test_a_far_frame_header_in_a_large_object_costs_one_read_more_than_usual() -> None:
    data = behind_comments(jpeg(1500, 1500, "live", seed=4), 100_000)
    code, ranges, _image = check(data)
    second = 2 + 0xFFFF + 2
    assert (code, ranges) == (None, [HEAD, f"bytes={second}-{second + MORE_BYTES - 1}", TAIL])


def test_a_tiny_jpeg_behind_a_large_comment_is_too_small() -> None:
    code, ranges, _ = check(behind_comments(jpeg(16, 16, "live", seed=5), 100_000))
    assert code == "too_small" and len(ranges) == 2, "no tail read for an image refused on its dimensions"


def test_a_chain_of_segments_costs_a_bounded_number_of_reads_then_is_refused() -> None:
    data = behind_comments(jpeg(128, 128, "live", seed=6), 12 * 0xFFFF)
    code, ranges, _ = check(data)
    assert code == "unknown_dimensions"
    assert len(ranges) == 1 + MAX_MORE_READS


def test_a_jpeg_header_that_runs_past_the_end_is_truncated_without_reading_further() -> None:
    whole = jpeg(128, 128, "live", seed=7)
    cut = behind_comments(whole, 30_000)[:20_000]
    assert check(cut)[:2] == ("truncated", [HEAD])
    big_cut = behind_comments(whole, 200_000)[:150_000]
    code, ranges, _ = check(big_cut)
    assert code == "truncated" and len(ranges) == 3, ranges


def test_a_segment_length_past_the_end_of_a_large_object_stops_at_the_end() -> None:
    data = behind_comments(jpeg(128, 128, "live", seed=8), 90_000)
    second = 2 + 0xFFFF + 2
    # The second COM segment claims 64 KiB although the file ends 30 KB later.
    lying = data[: second + 2] + b"\xff\xff" + data[second + 4 :]
    code, ranges, _ = check(lying)
    assert (code, ranges) == ("truncated", [HEAD, f"bytes={second}-{len(lying) - 1}"])


@pytest.mark.parametrize("fmt", ["WEBP", "BMP"])
def test_truncated_webp_and_bmp_are_refused_from_their_declared_length(fmt: str) -> None:
    small, large = encoded(fmt, 96, 96), encoded(fmt, 300, 300, seed=12)
    assert check(small[: len(small) * 6 // 10])[:2] == ("truncated", [HEAD])
    assert check(small[:-1])[0] == "truncated"
    if fmt == "BMP":
        assert len(large) > HEAD_BYTES
        assert check(large[: len(large) - 1000])[:2] == ("truncated", [HEAD]), "no tail read needed"
    assert check(small + b"\x00" * 10)[0] is None, "trailing padding is harmless"


def test_dimension_bounds() -> None:
    assert check(png_declaring(65535, 65535))[0] == "too_large_dimensions"
    assert check(png(4097, 64, "live"))[0] == "too_large_dimensions"
    assert check(png(64, 4097, "live"))[0] == "too_large_dimensions"
    assert check(png(4096, 64, "live"))[0] is None
    assert check(png(100, 100, "live"), Limits(max_side=99))[0] == "too_large_dimensions"
    assert check(png(100, 100, "live"), Limits(max_side=100))[0] is None
    assert check(png(63, 100, "live"))[0] == "too_small"


def test_the_refusals_say_which_setting_applies() -> None:
    storage = CountingStorage({"bomb": png_declaring(65535, 65535)})
    with pytest.raises(PermanentInputError, match=r"65535x65535.*at most 4096.*IRLIVE_MAX_IMAGE_SIDE"):
        validate(cast(Storage, storage), "b", "bomb", Limits())


def test_an_image_whose_dimensions_cannot_be_read_is_refused() -> None:
    good_png = png(96, 96, "live")
    # An ancillary chunk where IHDR must be: decoders refuse it, so its size cannot be trusted either.
    no_ihdr = good_png[:8] + b"\x00\x00\x00\x00tIME" + good_png[8:]
    assert check(no_ihdr)[0] == "unknown_dimensions"
    scan_first = b"\xff\xd8\xff\xda\x00\x08" + bytes(6) + b"\xff\xd9"
    assert check(scan_first)[0] == "unknown_dimensions"


def test_an_object_replaced_between_reads_is_not_found() -> None:
    data = behind_comments(jpeg(128, 128, "live", seed=9), 100_000)
    storage = CountingStorage({"k": data})
    original = storage.read_head

    def replaced_after_head(bucket: str, key: str, max_bytes: int) -> tuple[ObjectInfo, bytes]:
        answer = original(bucket, key, max_bytes)
        storage.objects[key] = data + b"\x00"
        return answer

    storage.read_head = replaced_after_head  # type: ignore[method-assign]
    with pytest.raises(NotFound):
        validate(cast(Storage, storage), "b", "k", Limits())


# --- on the real stack ------------------------------------------------------------------------------------


def worker_gets(log: Path, since: int, keys: list[str]) -> Counter[str]:
    """S3 GETs the workers made for each key after byte `since` of the moto log (the seller's fetches excluded).

    moto logs through werkzeug, which colours some status lines: the match avoids the quote before GET.
    """
    lines = log.read_bytes()[since:].decode(errors="replace").splitlines()
    counts: Counter[str] = Counter()
    for key in keys:
        # Every read of a worker is ranged (206); the seller fetches whole objects (200).
        pattern = re.compile(rf"GET /{IN_BUCKET}/{re.escape(quote(key))}(\?\S*)? HTTP/\S*\" 206 ")
        counts[key] = sum(1 for line in lines if pattern.search(line))
    return counts


@pytest.mark.integration
def test_bad_headers_are_refused_before_paying_and_the_rest_judged_in_one_call(
    clean_stack: Stack, irlive: IrliveRunner
) -> None:
    webp, bmp = encoded("WEBP", 128, 128, seed=21), encoded("BMP", 128, 128, seed=22)
    invalid = {
        "val/cut.webp": (webp[: len(webp) * 6 // 10], "truncated"),
        "val/cut.bmp": (bmp[: len(bmp) * 6 // 10], "truncated"),
        "val/tiny_behind_comment.jpg": (behind_comments(jpeg(16, 16, "live", seed=3), 100_000), "too_small"),
        "val/bomb.png": (png_declaring(65535, 65535), "too_large_dimensions"),
        "val/wide.png": (png(4100, 64, "live", seed=4), "too_large_dimensions"),
    }
    whole_webp, whole_bmp = encoded("WEBP", seed=31), encoded("BMP", seed=32)
    far_sof = behind_comments(jpeg(128, 128, "spoof", seed=5), 100_000)
    big_png = png(96, 96, "live", seed=6, pad_to=200_000)
    fine = [
        *(good(f"val/ok_{i}.png", i) for i in range(3)),
        Sample("val/ok.webp", whole_webp, truth_verdict(fallback_truth(whole_webp))),
        Sample("val/ok.bmp", whole_bmp, truth_verdict(fallback_truth(whole_bmp))),
        Sample("val/ok_far_sof.jpg", far_sof, "spoof"),
        Sample("val/ok_big.png", big_png, "live"),
    ]
    upload(clean_stack, [Sample(k, body, "rejected") for k, (body, _) in invalid.items()])
    upload(clean_stack, fine)
    moto_log = clean_stack.log_path("moto")
    since = moto_log.stat().st_size
    clean_stack.start_worker()

    run = read_run(clean_stack, scan_and_wait(irlive, f"s3://{IN_BUCKET}/val", timeout=90))

    ledger = clean_stack.sandbox_ledger()
    assert (ledger["calls_billed"], billed_keys(clean_stack)) == (1, Counter(s.key for s in fine)), (
        "one call for the seven valid images and nothing for the rest: no bisection, no bad image paid for")
    expected = {k: "rejected" for k in invalid} | {s.key: s.expected for s in fine}
    got = check_run(clean_stack, run, expected)
    codes = {key: (got[key]["error_code"], got[key]["reason"]) for key in invalid}
    assert {key: code for key, (code, _) in codes.items()} == {k: code for k, (_, code) in invalid.items()}, codes
    for key in ("val/bomb.png", "val/wide.png"):
        assert "IRLIVE_MAX_IMAGE_SIDE" in got[key]["reason"]
    gets = worker_gets(moto_log, since, ["val/ok_0.png", "val/ok_big.png", "val/ok_far_sof.jpg"])
    assert gets == {"val/ok_0.png": 1, "val/ok_big.png": 2, "val/ok_far_sof.jpg": 2}, gets
