"""Unit tests of worker.judge.imageinfo: format sniffing, header dimensions, and end-of-file checks."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from worker.judge.imageinfo import HEAD_BYTES, TAIL_BYTES, ImageInfo, complete, sniff


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = b"".join(b"\x00" + bytes(width) for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _sof(marker: int, width: int, height: int) -> bytes:
    return _segment(marker, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")


def _jpeg_head(*segments: bytes) -> bytes:
    return b"\xff\xd8" + b"".join(segments)


def _gif(width: int, height: int, version: bytes = b"GIF89a") -> bytes:
    return version + struct.pack("<HHBBB", width, height, 0, 0, 0) + b",\x00\x00\x00\x00\x01\x00\x01\x00\x00;"


def _bmp(width: int, height: int, header_size: int = 40) -> bytes:
    if header_size == 12:
        dib = struct.pack("<IHHHH", 12, width, height, 1, 24)
    else:
        dib = struct.pack("<IiiHHIIiiII", header_size, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
        dib += bytes(header_size - len(dib))
    return b"BM" + struct.pack("<IHHI", 14 + len(dib), 0, 0, 14 + len(dib)) + dib


def _webp(chunk: bytes, payload: bytes) -> bytes:
    body = b"WEBP" + chunk + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _vp8x(width: int, height: int) -> bytes:
    return _webp(b"VP8X", b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"))


def _vp8(width: int, height: int) -> bytes:
    return _webp(b"VP8 ", b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + bytes(8))


def _vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | ((height - 1) << 14)
    return _webp(b"VP8L", b"\x2f" + struct.pack("<I", bits) + bytes(4))


def test_sizes_of_the_ranged_gets() -> None:
    assert HEAD_BYTES == 65536
    assert TAIL_BYTES == 16


def test_png() -> None:
    data = _png(300, 200)
    assert sniff(data) == ImageInfo("png", 300, 200)
    assert complete("png", data[-TAIL_BYTES:])


def test_png_cut_before_ihdr_has_no_dimensions() -> None:
    assert sniff(_png(300, 200)[:20]) == ImageInfo("png", None, None)


@pytest.mark.parametrize("version", [b"GIF87a", b"GIF89a"])
def test_gif(version: bytes) -> None:
    data = _gif(320, 240, version)
    assert sniff(data) == ImageInfo("gif", 320, 240)
    assert complete("gif", data[-TAIL_BYTES:])
    assert not complete("gif", data[:-1][-TAIL_BYTES:])


def test_bmp_bottom_up_and_top_down() -> None:
    assert sniff(_bmp(640, 480)) == ImageInfo("bmp", 640, 480)
    assert sniff(_bmp(640, -480)) == ImageInfo("bmp", 640, 480)


def test_bmp_v5_and_core_headers() -> None:
    assert sniff(_bmp(50, 60, header_size=124)) == ImageInfo("bmp", 50, 60)
    assert sniff(_bmp(50, 60, header_size=12)) == ImageInfo("bmp", 50, 60)


def test_bmp_and_webp_ends_are_checked_elsewhere() -> None:
    assert complete("bmp", b"")
    assert complete("webp", b"\x00" * 4)


@pytest.mark.parametrize(
    ("data", "width", "height"),
    [(_vp8x(1920, 1080), 1920, 1080), (_vp8(400, 300), 400, 300), (_vp8l(16383, 2), 16383, 2)],
)
def test_webp(data: bytes, width: int, height: int) -> None:
    assert sniff(data) == ImageInfo("webp", width, height)


def test_webp_unknown_chunk_has_no_dimensions() -> None:
    assert sniff(_webp(b"ALPH", bytes(16))) == ImageInfo("webp", None, None)


def test_riff_that_is_not_webp_is_not_an_image() -> None:
    assert sniff(b"RIFF\x24\x00\x00\x00WAVEfmt ") is None


def test_jpeg_sof_directly() -> None:
    assert sniff(_jpeg_head(_sof(0xC0, 640, 480))) == ImageInfo("jpeg", 640, 480)


def test_jpeg_with_app_and_comment_segments_before_sof() -> None:
    head = _jpeg_head(
        _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
        _segment(0xE1, b"Exif\x00\x00" + bytes(30000)),
        _segment(0xFE, b"a comment with \xff\xc0 inside"),
        _segment(0xDB, bytes(65)),
        _sof(0xC2, 1024, 768),
    )
    assert sniff(head) == ImageInfo("jpeg", 1024, 768)


def test_jpeg_fill_bytes_and_standalone_markers() -> None:
    head = b"\xff\xd8" + b"\xff\xff\xff" + _segment(0xE0, b"x") + b"\xff\xd3\xff\x01" + b"\xff" + _sof(0xC1, 8, 9)
    assert sniff(head) == ImageInfo("jpeg", 8, 9)


@pytest.mark.parametrize("marker", [0xC4, 0xC8, 0xCC])
def test_jpeg_markers_in_the_sof_range_that_are_not_sof(marker: int) -> None:
    head = _jpeg_head(_segment(marker, b"\x00\x10\x00\x20\x00\x01"), _sof(0xC0, 33, 44))
    assert sniff(head) == ImageInfo("jpeg", 33, 44)


def test_jpeg_sof_beyond_the_head_gives_no_dimensions() -> None:
    # A big EXIF block and an ICC profile push the frame header past the first HEAD_BYTES.
    full = _jpeg_head(_segment(0xE1, bytes(40000)), _segment(0xE2, bytes(40000)), _sof(0xC0, 640, 480))
    assert len(full) > HEAD_BYTES
    assert sniff(full) == ImageInfo("jpeg", 640, 480)
    assert sniff(full[:HEAD_BYTES]) == ImageInfo("jpeg", None, None)


def test_jpeg_scan_before_any_sof_gives_no_dimensions() -> None:
    head = _jpeg_head(_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"), b"\x12\x34\xff\x00", _sof(0xC0, 1, 1))
    assert sniff(head) == ImageInfo("jpeg", None, None)


def test_jpeg_zero_dimension_is_unknown() -> None:
    assert sniff(_jpeg_head(_sof(0xC0, 0, 480))) == ImageInfo("jpeg", None, None)


def test_jpeg_end() -> None:
    assert complete("jpeg", b"\x12\x34\xff\xd9")
    assert complete("jpeg", b"\x12\x34\xff\xd9\x00\x00\r\n")
    assert not complete("jpeg", b"\x12\x34\xff\xd9\x55")
    assert not complete("jpeg", b"\x12\x34\x56\x78")
    assert not complete("jpeg", b"")


def test_truncated_png_end() -> None:
    data = _png(64, 64)
    assert not complete("png", data[: len(data) * 6 // 10][-TAIL_BYTES:])
    assert not complete("png", data[:-1][-TAIL_BYTES:])


def test_unknown_format_is_never_complete() -> None:
    assert not complete("tiff", b"anything")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is a text file named photo.png\n",
        b"\x89PNX\r\n\x1a\n" + bytes(30),
        b"\xff\xd8",  # SOI alone is not enough: every real JPEG continues with a marker
        b"GIF88a" + bytes(10),
        b"BA" + bytes(30),
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"%PDF-1.7\n",
    ],
)
def test_not_an_image(data: bytes) -> None:
    assert sniff(data) is None


def test_every_prefix_of_every_format_is_safe() -> None:
    samples = [
        _png(10, 10),
        _jpeg_head(_segment(0xE0, b"JFIF\x00"), _segment(0xFE, b"hi"), _sof(0xC0, 10, 10)),
        _gif(10, 10),
        _bmp(10, 10),
        _bmp(10, 10, header_size=12),
        _vp8x(10, 10),
        _vp8(10, 10),
        _vp8l(10, 10),
    ]
    for data in samples:
        full = sniff(data)
        assert full is not None and (full.width, full.height) == (10, 10)
        for cut in range(len(data)):
            info = sniff(data[:cut])
            if info is not None:
                assert info.format == full.format
                assert info.width in (None, 10) and info.height in (None, 10)


def test_garbage_after_magic_never_raises() -> None:
    rng = random.Random(1234)
    magics = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 "]
    for _ in range(2000):
        magic = rng.choice(magics)
        info = sniff(magic + rng.randbytes(rng.randrange(0, 64)))
        assert info is not None
        assert info.width is None or info.width > 0
        assert info.height is None or info.height > 0
