"""Unit tests of worker.judge.imageinfo: format sniffing, header dimensions, declared lengths, end-of-file checks."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from PIL import Image

from worker.judge.imageinfo import (
    HEAD_BYTES,
    MAX_MORE_READS,
    MORE_BYTES,
    TAIL_BYTES,
    ImageInfo,
    complete,
    declared_length,
    resume,
    sniff,
)


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


def _pillow(fmt: str, mode: str = "RGB", size: tuple[int, int] = (33, 17), **params: object) -> bytes:
    rng = random.Random(7)
    picture = Image.frombytes("L", size, rng.randbytes(size[0] * size[1])).convert(mode)
    out = io.BytesIO()
    picture.save(out, fmt, **params)
    return out.getvalue()


def test_sizes_of_the_ranged_gets() -> None:
    assert HEAD_BYTES == 65536
    assert TAIL_BYTES == 16
    # Every further read gets past at least one whole JPEG segment (at most 2 + 65535 bytes) but the last.
    assert MORE_BYTES >= 65536 and 1 <= MAX_MORE_READS <= 4


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
    ("fmt", "mode", "params"),
    [
        ("BMP", "1", {}), ("BMP", "L", {}), ("BMP", "P", {}), ("BMP", "RGB", {}), ("BMP", "RGBA", {}),
        ("WEBP", "RGB", {}), ("WEBP", "RGB", {"lossless": True}), ("WEBP", "RGBA", {}),
    ],
)
def test_declared_length_of_pillow_files_is_their_size(fmt: str, mode: str, params: dict[str, object]) -> None:
    data = _pillow(fmt, mode, **params)
    assert declared_length(fmt.lower(), data) == len(data)
    assert declared_length(fmt.lower(), data[:HEAD_BYTES]) == len(data)
    cut = data[: len(data) * 6 // 10]
    assert (declared_length(fmt.lower(), cut) or 0) > len(cut)


def test_bmp_rows_count_when_the_file_size_field_is_zero_or_understated() -> None:
    data = _pillow("BMP", "RGB", size=(33, 17))
    for size_field in (0, 100):
        patched = data[:2] + struct.pack("<I", size_field) + data[6:]
        assert declared_length("bmp", patched) == len(data)
    core = _bmp(10, 10, header_size=12)
    # 10 pixels of 24 bits padded to 32 bytes a row, after the 26-byte headers.
    assert declared_length("bmp", core[:2] + bytes(4) + core[6:]) == 26 + 32 * 10


def test_bmp_compressed_rows_have_no_length_of_their_own() -> None:
    rle = bytearray(_bmp(640, 480))
    rle[30:34] = struct.pack("<I", 1)  # BI_RLE8
    assert declared_length("bmp", bytes(rle)) == 54


def test_webp_first_chunk_must_be_whole_even_if_riff_says_less() -> None:
    data = _vp8(400, 300)
    understated = data[:4] + struct.pack("<I", 4) + data[8:]
    assert declared_length("webp", understated) == len(data)


def test_declared_length_of_formats_without_one_and_of_short_heads() -> None:
    assert declared_length("png", _png(10, 10)) is None
    assert declared_length("jpeg", _jpeg_head(_sof(0xC0, 1, 1))) is None
    assert declared_length("gif", _gif(1, 1)) is None
    assert declared_length("bmp", b"BM") is None
    assert declared_length("webp", b"RIFF") is None
    assert declared_length("webp", b"RIFF\x10\x00\x00\x00WEBP") == 24


def test_a_tiny_png_declaring_huge_dimensions_says_so() -> None:
    bomb = _png(1, 1)
    bomb = bomb[:16] + struct.pack(">II", 65535, 65535) + bomb[24:]
    assert len(bomb) < 100
    assert sniff(bomb) == ImageInfo("png", 65535, 65535)


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


def test_jpeg_sof_beyond_the_head_says_where_to_read_on() -> None:
    # A big EXIF block and an ICC profile push the frame header past the first HEAD_BYTES.
    full = _jpeg_head(_segment(0xE1, bytes(40000)), _segment(0xE2, bytes(40000)), _sof(0xC0, 640, 480))
    assert len(full) > HEAD_BYTES
    assert sniff(full) == ImageInfo("jpeg", 640, 480)
    icc_end = 2 + (4 + 40000) * 2
    cut = sniff(full[:HEAD_BYTES])
    assert cut == ImageInfo("jpeg", None, None, more_at=icc_end)
    assert resume(cut, full[icc_end:]) == ImageInfo("jpeg", 640, 480)


def test_jpeg_tiny_frame_behind_comments_larger_than_the_head() -> None:
    comments = [_segment(0xFE, b"c" * 65533), _segment(0xFE, b"c" * 40000)]
    full = _jpeg_head(*comments, _segment(0xDB, bytes(65)), _sof(0xC0, 16, 16))
    head = sniff(full[:HEAD_BYTES])
    assert head is not None and head.more_at == 2 + 65537
    assert resume(head, full[head.more_at :]) == ImageInfo("jpeg", 16, 16)


def test_jpeg_walk_in_windows_of_any_size_finds_the_same_frame() -> None:
    full = _jpeg_head(
        _segment(0xE0, b"JFIF\x00\x01\x01"), b"\xff\xff", _segment(0xFE, b"x" * 300), b"\xff\xd0",
        _segment(0xE1, bytes(1000)), _sof(0xC2, 321, 123),
    )
    # 9 bytes hold a frame header up to its width: any window that large moves the walk on.
    for window in (9, 10, 13, 64, 333, 1000):
        info = sniff(full[:window])
        while info is not None and info.more_at is not None:
            assert info.more_at < len(full)
            following = resume(info, full[info.more_at : info.more_at + window])
            assert following.more_at is None or following.more_at > info.more_at, f"window {window}: no progress"
            info = following
        assert info == ImageInfo("jpeg", 321, 123), window
    for window in range(4):
        info = sniff(full[:9])
        assert info is not None and info.more_at is not None
        following = resume(info, full[info.more_at : info.more_at + window])
        assert following.more_at is not None and following.more_at >= info.more_at, "never goes back"


def test_jpeg_junk_between_segments_is_skipped_like_decoders_do() -> None:
    head = _jpeg_head(_segment(0xE0, b"JFIF\x00"), b"junk\xff\x00more", _sof(0xC0, 70, 80))
    assert sniff(head) == ImageInfo("jpeg", 70, 80)


def test_jpeg_walk_that_needs_more_points_at_a_segment_start() -> None:
    sof = _sof(0xC0, 70, 80)
    full = _jpeg_head(_segment(0xFE, b"hi"), sof)
    start = len(full) - len(sof)
    # Marker, length, precision, height and width: 9 bytes.
    for cut in range(start, start + 9):
        assert sniff(full[:cut]) == ImageInfo("jpeg", None, None, more_at=start), cut
    fill = _jpeg_head(_segment(0xFE, b"hi")) + b"\xff" * 5
    assert sniff(fill) == ImageInfo("jpeg", None, None, more_at=len(fill) - 1)


def test_resume_leaves_other_formats_and_finished_walks_alone() -> None:
    png_info = ImageInfo("png", None, None)
    assert resume(png_info, b"\xff\xc0\x00\x11\x08\x00\x10\x00\x10") is png_info
    done = ImageInfo("jpeg", 10, 10)
    assert resume(done, b"anything") is done
    stuck = ImageInfo("jpeg", None, None, more_at=70000)
    assert resume(stuck, b"") == stuck


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


MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
          b"RIFF\xff\xff\xff\xffWEBPVP8X", b"RIFF\x00\x00\x00\x00WEBPVP8L"]


def _check_hostile(head: bytes, rng: random.Random) -> None:
    info = sniff(head)
    assert info is not None
    assert info.width is None or info.width > 0
    assert info.height is None or info.height > 0
    length = declared_length(info.format, head)
    assert length is None or length >= 0
    if info.more_at is not None:
        assert info.format == "jpeg" and info.more_at >= 2
        following = resume(info, rng.randbytes(rng.randrange(0, 300)))
        assert following.more_at is None or following.more_at >= info.more_at


def test_garbage_after_magic_never_raises() -> None:
    rng = random.Random(1234)
    for _ in range(5000):
        _check_hostile(rng.choice(MAGICS) + rng.randbytes(rng.randrange(0, 64)), rng)


def test_marker_rich_garbage_never_raises() -> None:
    # Bytes drawn mostly from markers, lengths and fill: what reaches the deep branches of the JPEG walk.
    rng = random.Random(99)
    alphabet = [0xFF, 0xFF, 0xFF, 0x00, 0x01, 0x02, 0xC0, 0xC4, 0xD0, 0xD9, 0xDA, 0xE1, 0xFE, 0x10]
    for _ in range(3000):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
        _check_hostile(b"\xff\xd8\xff" + body, rng)


def test_mutated_valid_files_never_raise() -> None:
    rng = random.Random(4321)
    samples = [
        _png(20, 20), _gif(20, 20), _bmp(20, 20), _bmp(20, 20, header_size=12), _vp8x(20, 20), _vp8(20, 20),
        _vp8l(20, 20), _pillow("BMP"), _pillow("WEBP"), _pillow("JPEG"),
        _jpeg_head(_segment(0xE0, b"JFIF\x00"), _segment(0xFE, b"hi"), _sof(0xC0, 20, 20)),
    ]
    for _ in range(3000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(2, len(data))
            data[at] = rng.randrange(256)
        head = bytes(data[: rng.randrange(3, len(data) + 1)])
        if sniff(head) is not None:
            _check_hostile(head, rng)


def test_absurd_lengths_are_plain_numbers() -> None:
    bmp = b"BM" + b"\xff" * 4 + bytes(4) + b"\xff" * 4 + struct.pack("<IiiHHI", 40, 2**31 - 1, -(2**31), 1, 32, 0)
    assert (declared_length("bmp", bmp) or 0) > 2**32
    assert sniff(bmp) == ImageInfo("bmp", 2**31 - 1, 2**31)
    webp = b"RIFF\xff\xff\xff\xffWEBPVP8 \xff\xff\xff\xff"
    assert declared_length("webp", webp) == 2**32 - 1 + 20
