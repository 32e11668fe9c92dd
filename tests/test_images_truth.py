"""Unit tests of the sandbox's synthetic captures (sandbox.images) and ground truth (sandbox.truth)."""

from __future__ import annotations

import random
import struct
import zlib
from collections import Counter
from collections.abc import Callable

import pytest

from sandbox.images import OVERSIZED_BYTES, Sample, demo_corpus, jpeg, png
from sandbox.truth import TRUTH_KEYWORD, fallback_truth, read_truth, truth_verdict
from worker.imageinfo import TAIL_BYTES, ImageInfo, complete, sniff

TEN_MIB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def corpus() -> list[Sample]:
    return demo_corpus()


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    chunks = []
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data)
    return chunks


def _huffman_decoder(bits: bytes, values: bytes) -> dict[tuple[int, int], int]:
    table: dict[tuple[int, int], int] = {}
    code = k = 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            table[(length, code)] = values[k]
            code += 1
            k += 1
        code <<= 1
    return table


def _jpeg_block_means(data: bytes) -> tuple[int, int, list[float]]:
    """Width, height and every block's mean decoded from the DC terms: proves the scan decodes to the end."""
    pos = 2
    quant: bytes = b""
    tables: dict[int, dict[tuple[int, int], int]] = {}
    width = height = 0
    while True:
        marker = data[pos + 1]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        body = data[pos + 4 : pos + 2 + length]
        pos += 2 + length
        if marker == 0xDB:
            quant = body[1:65]
        elif marker == 0xC4:
            tables[body[0] >> 4] = _huffman_decoder(body[1:17], body[17:])
        elif marker == 0xC0:
            height, width = struct.unpack(">HH", body[1:5])
        elif marker == 0xDA:
            break
    assert data.endswith(b"\xff\xd9")
    scan = data[pos:-2]
    assert b"\xff" not in scan.replace(b"\xff\x00", b""), "unstuffed 0xFF in the scan"
    stream = scan.replace(b"\xff\x00", b"\xff")
    bitstring = "".join(f"{byte:08b}" for byte in stream)
    cursor = 0

    def symbol(table: dict[tuple[int, int], int]) -> int:
        nonlocal cursor
        code = 0
        for length in range(1, 17):
            code = (code << 1) | (bitstring[cursor] == "1")
            cursor += 1
            if (length, code) in table:
                return table[(length, code)]
        raise AssertionError("no Huffman code matched")

    def receive(size: int) -> int:
        nonlocal cursor
        if size == 0:
            return 0
        raw = int(bitstring[cursor : cursor + size], 2)
        cursor += size
        return raw if raw >= 1 << (size - 1) else raw - (1 << size) + 1

    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    means = []
    dc = 0
    for _ in range(blocks):
        dc += receive(symbol(tables[0]))
        means.append(dc * quant[0] / 8 + 128)
        k = 1
        while k < 64:
            rs = symbol(tables[1])
            if rs == 0x00:
                break
            k += (rs >> 4) + 1
            receive(rs & 0x0F)
        assert k <= 64
    assert len(bitstring) - cursor < 8 and set(bitstring[cursor:]) <= {"1"}, "data left after the last block"
    return width, height, means


@pytest.mark.parametrize(("width", "height"), [(256, 256), (320, 240), (17, 9), (1, 1)])
def test_png_is_valid_and_sniffed(width: int, height: int) -> None:
    data = png(width, height, "live", seed=3)
    chunks = _png_chunks(data)
    assert [kind for kind, _ in chunks] == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    assert len(zlib.decompress(chunks[2][1])) == height * (width + 1)
    assert sniff(data) == ImageInfo("png", width, height)
    assert complete("png", data[-TAIL_BYTES:])


def test_png_without_truth_has_no_text_chunk() -> None:
    data = png(64, 64, None)
    assert b"tEXt" not in data
    assert read_truth(data) is None


def test_png_is_deterministic_per_seed() -> None:
    assert png(64, 48, "spoof", seed=1) == png(64, 48, "spoof", seed=1)
    assert png(64, 48, "spoof", seed=1) != png(64, 48, "spoof", seed=2)


def test_png_padding_keeps_it_valid() -> None:
    data = png(32, 32, "live", pad_to=100_000)
    assert len(data) == 100_000
    assert [kind for kind, _ in _png_chunks(data)] == [b"IHDR", b"tEXt", b"IDAT", b"irPd", b"IEND"]


@pytest.mark.parametrize("maker", [png, jpeg])
def test_size_must_be_positive(maker: Callable[[int, int, str | None], bytes]) -> None:
    with pytest.raises(ValueError):
        maker(0, 10, "live")
    with pytest.raises(ValueError):
        maker(10, 0, "live")


@pytest.mark.parametrize(("width", "height"), [(256, 256), (100, 37), (8, 8), (3, 1)])
def test_jpeg_is_valid_and_sniffed(width: int, height: int) -> None:
    data = jpeg(width, height, "live", seed=4)
    assert sniff(data) == ImageInfo("jpeg", width, height)
    assert complete("jpeg", data[-TAIL_BYTES:])
    assert _jpeg_block_means(data)[:2] == (width, height)


def test_jpeg_pixels_follow_the_picture() -> None:
    # Background blocks are dark, and the face in the middle is bright: the DCT and quantizer are right.
    data = jpeg(256, 256, "live", seed=5)
    means = _jpeg_block_means(data)[2]
    corner, centre = means[0], means[16 * 32 + 16]
    assert 10 < corner < 45
    assert centre > 120


def test_png_and_jpeg_truth_round_trip() -> None:
    for value, faces in [("live", ["live"]), ("spoof", ["spoof"]), ("no_face", []), ("live,spoof", ["live", "spoof"])]:
        assert read_truth(png(40, 40, value)) == faces
        assert read_truth(jpeg(40, 40, value)) == faces


def test_jpeg_without_truth_has_no_comment() -> None:
    data = jpeg(16, 16, None)
    assert b"\xff\xfe" not in data.split(b"\xff\xda")[0]
    assert read_truth(data) is None


def test_truth_in_a_later_comment_and_after_idat() -> None:
    comment = TRUTH_KEYWORD.encode() + b"=spoof"
    other = b"\xff\xfe" + struct.pack(">H", 2 + 5) + b"hello"
    mine = b"\xff\xfe" + struct.pack(">H", 2 + len(comment)) + comment
    assert read_truth(b"\xff\xd8\xff\xff" + other + mine + b"\xff\xd9") == ["spoof"]

    base = png(8, 8, None)
    text = TRUTH_KEYWORD.encode() + b"\x00live, live"
    text_chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    with_late_text = base[:-12] + text_chunk + base[-12:]
    assert read_truth(with_late_text) == ["live", "live"]


@pytest.mark.parametrize("value", ["alive", "", "live,", "no_face,live", "LIVE", "live;spoof"])
def test_malformed_truth_is_none(value: str) -> None:
    assert read_truth(png(8, 8, value)) is None
    assert read_truth(jpeg(8, 8, value)) is None


@pytest.mark.parametrize(
    "data", [b"", b"plain text", b"GIF89a\x01\x00\x01\x00", b"\x89PNG\r\n\x1a\n\x00\x00", b"\xff\xd8\xff"]
)
def test_truth_of_other_or_broken_data_is_none(data: bytes) -> None:
    assert read_truth(data) is None


def test_truth_survives_truncation() -> None:
    data = png(64, 64, "spoof")
    assert read_truth(data[: len(data) * 6 // 10]) == ["spoof"]


def test_fallback_is_deterministic_and_roughly_weighted() -> None:
    assert fallback_truth(b"abc") == fallback_truth(b"abc")
    rng = random.Random(99)
    counts = Counter(truth_verdict(fallback_truth(rng.randbytes(32))) for _ in range(5000))
    assert 0.66 < counts["live"] / 5000 < 0.74
    assert 0.17 < counts["spoof"] / 5000 < 0.23
    assert 0.07 < counts["no_face"] / 5000 < 0.13


def test_truth_verdict() -> None:
    assert truth_verdict([]) == "no_face"
    assert truth_verdict(["live"]) == "live"
    assert truth_verdict(["live", "live"]) == "live"
    assert truth_verdict(["live", "spoof"]) == "spoof"
    assert truth_verdict(["spoof"]) == "spoof"


def test_corpus_size_and_keys(corpus: list[Sample]) -> None:
    assert len(corpus) == 200
    keys = [s.key for s in corpus]
    assert len(set(keys)) == len(keys)
    assert all(k.startswith("captures/2026-11-2") for k in keys)
    names = [k.rsplit("/", 1)[1] for k in keys]
    assert any(" " in n for n in names)
    assert any("+" in n for n in names)
    assert any(not n.isascii() for n in names)


def test_corpus_mix(corpus: list[Sample]) -> None:
    counts = Counter(s.expected for s in corpus)
    assert counts["rejected"] == 5
    assert counts["live"] > counts["spoof"] > counts["no_face"] > 0
    valid = [s for s in corpus if s.expected != "rejected"]
    jpegs = [s for s in valid if s.key.endswith(".jpg")]
    assert 0.07 < len(jpegs) / len(valid) < 0.13
    multi = Counter(",".join(faces) for s in valid if (faces := read_truth(s.body)) and len(faces) > 1)
    assert multi["live,spoof"] >= 1 and multi["live,live"] >= 1


def test_corpus_valid_samples(corpus: list[Sample]) -> None:
    for sample in corpus:
        if sample.expected == "rejected":
            continue
        info = sniff(sample.body)
        assert info is not None and info.width == 256 and info.height == 256, sample.key
        assert info.format == ("jpeg" if sample.key.endswith(".jpg") else "png")
        assert complete(info.format, sample.body[-TAIL_BYTES:])
        assert len(sample.body) < TEN_MIB
        faces = read_truth(sample.body)
        assert truth_verdict(fallback_truth(sample.body) if faces is None else faces) == sample.expected


def test_corpus_rejected_samples(corpus: list[Sample]) -> None:
    bodies = [s.body for s in corpus if s.expected == "rejected"]
    assert len(bodies) == 5
    text = next(b for b in bodies if sniff(b) is None and b)
    assert text.isascii()
    assert b"" in bodies
    assert next(s for s in corpus if s.body == b"").key.endswith(".jpg")
    big = [b for b in bodies if len(b) > TEN_MIB]
    assert len(big) == 1 and len(big[0]) == OVERSIZED_BYTES
    assert sniff(big[0]) == ImageInfo("png", 256, 256) and complete("png", big[0][-TAIL_BYTES:])
    small = [b for b in bodies if (info := sniff(b)) is not None and info.width == 16]
    assert len(small) == 1 and complete("png", small[0][-TAIL_BYTES:])
    truncated = [b for b in bodies if sniff(b) == ImageInfo("png", 256, 256) and len(b) < TEN_MIB]
    assert len(truncated) == 1 and not complete("png", truncated[0][-TAIL_BYTES:])


def test_corpus_is_deterministic_and_seeded() -> None:
    first = demo_corpus(n=20, seed=3)
    assert first == demo_corpus(n=20, seed=3)
    assert [s.body for s in first] != [s.body for s in demo_corpus(n=20, seed=4)]


def test_corpus_prefix_and_small_sizes() -> None:
    samples = demo_corpus(n=12, prefix="/tenant-a/in/")
    assert len(samples) == 12
    assert all(s.key.startswith("tenant-a/in/2026-11-2") for s in samples)
    assert Counter(s.expected for s in samples)["rejected"] == 5
    assert len(demo_corpus(n=5)) == 5
    with pytest.raises(ValueError):
        demo_corpus(n=4)
