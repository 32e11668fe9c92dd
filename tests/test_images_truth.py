"""Unit tests of the sandbox's synthetic captures (sandbox.images) and ground truth (sandbox.truth)."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections import Counter
from collections.abc import Callable

import pytest
from PIL import Image

from sandbox.images import OVERSIZED_BYTES, Sample, demo_corpus, jpeg, png
from sandbox.truth import TRUTH_KEYWORD, fallback_truth, image_truth_text, read_truth, truth_text, truth_verdict

TEN_MIB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def corpus() -> list[Sample]:
    return demo_corpus()


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every chunk of a PNG, with its CRC checked and nothing after IEND."""
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


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _decoded(data: bytes) -> Image.Image:
    """The image fully decoded by Pillow, as the sandbox's upstream does; raises if it cannot be."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _kinds(data: bytes) -> list[bytes]:
    # Pillow may split the pixel data over several IDAT chunks; the order of the kinds is what matters.
    kinds = [kind for kind, _ in _png_chunks(data)]
    return [kind for i, kind in enumerate(kinds) if kind != b"IDAT" or kinds[i - 1] != b"IDAT"]


@pytest.mark.parametrize(("width", "height"), [(256, 256), (320, 240), (17, 9), (1, 1)])
def test_png_decodes_at_its_size_and_carries_its_truth(width: int, height: int) -> None:
    data = png(width, height, "live", seed=3)
    assert _kinds(data) == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    image = _decoded(data)
    assert (image.format, image.mode, image.size) == ("PNG", "L", (width, height))
    assert image.info[TRUTH_KEYWORD] == "live"
    assert read_truth(data) == ["live"]


def test_png_without_truth_has_no_text_chunk() -> None:
    data = png(64, 64, None)
    assert b"tEXt" not in data
    assert _kinds(data) == [b"IHDR", b"IDAT", b"IEND"]
    assert read_truth(data) is None


@pytest.mark.parametrize("maker", [png, jpeg])
def test_images_are_deterministic_per_seed(maker: Callable[..., bytes]) -> None:
    assert maker(64, 48, "spoof", seed=1) == maker(64, 48, "spoof", seed=1)
    assert maker(64, 48, "spoof", seed=1) != maker(64, 48, "spoof", seed=2)
    assert maker(64, 48, "spoof", seed=1) != maker(64, 48, "live", seed=1)


def test_png_padding_keeps_it_valid() -> None:
    data = png(32, 32, "live", pad_to=100_000)
    assert len(data) == 100_000
    assert _kinds(data) == [b"IHDR", b"tEXt", b"IDAT", b"irPd", b"IEND"]
    assert _decoded(data).size == (32, 32)
    assert read_truth(data) == ["live"]
    # The pixels are those of the unpadded image.
    assert _decoded(data).tobytes() == _decoded(png(32, 32, "live")).tobytes()
    # Asking for less than the image already takes changes nothing; a few bytes more still gives at least that.
    plain = png(32, 32, "live")
    assert png(32, 32, "live", pad_to=len(plain)) == plain
    assert len(png(32, 32, "live", pad_to=len(plain) + 5)) >= len(plain) + 5


def test_oversized_png_is_valid_and_its_truth_is_read_without_decoding_it() -> None:
    data = png(256, 256, "spoof", seed=3, pad_to=OVERSIZED_BYTES)
    assert len(data) == OVERSIZED_BYTES
    assert _decoded(data).size == (256, 256)
    # The padding sits after the pixel data, so reading the truth only touches the first chunks.
    assert truth_text(data) == "spoof"
    assert truth_text(data[:4096]) == "spoof"


@pytest.mark.parametrize("maker", [png, jpeg])
def test_size_must_be_positive(maker: Callable[[int, int, str | None], bytes]) -> None:
    with pytest.raises(ValueError):
        maker(0, 10, "live")
    with pytest.raises(ValueError):
        maker(10, 0, "live")


@pytest.mark.parametrize(("width", "height"), [(256, 256), (100, 37), (8, 8), (3, 1)])
def test_jpeg_decodes_at_its_size_and_carries_its_truth(width: int, height: int) -> None:
    data = jpeg(width, height, "live", seed=4)
    assert data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9")
    image = _decoded(data)
    assert (image.format, image.mode, image.size) == ("JPEG", "L", (width, height))
    assert image.info["comment"] == f"{TRUTH_KEYWORD}=live".encode()
    assert read_truth(data) == ["live"]


def _extrema(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> tuple[int, int]:
    low, high = (image if box is None else image.crop(box)).getextrema()
    assert isinstance(low, int) and isinstance(high, int)
    return low, high


@pytest.mark.parametrize("maker", [png, jpeg])
def test_pixels_look_like_an_infrared_face(maker: Callable[..., bytes]) -> None:
    # A dark background, a bright face in the middle with dark eyes, and for a spoof a flat screen frame.
    live = _decoded(maker(256, 256, "live", seed=5))
    assert 10 < _extrema(live, (0, 0, 8, 8))[1] < 50
    assert _extrema(live, (120, 120, 136, 136))[0] > 110
    assert _extrema(live, (60, 80, 196, 130))[0] < 70
    spoof = _decoded(maker(256, 256, "spoof", seed=5))

    def screen_pixels(image: Image.Image) -> int:
        # The screen's level (70 plus noise) is used by nothing else in the picture.
        return sum(image.histogram()[66:80])

    assert screen_pixels(spoof) > 2000
    assert screen_pixels(live) < 200
    empty = _decoded(maker(256, 256, "no_face", seed=5))
    assert _extrema(empty)[1] < 60
    assert read_truth(maker(256, 256, "no_face", seed=5)) == []


def test_png_and_jpeg_truth_round_trip() -> None:
    for value, faces in [("live", ["live"]), ("spoof", ["spoof"]), ("no_face", []), ("live,spoof", ["live", "spoof"])]:
        assert read_truth(png(40, 40, value)) == faces
        assert read_truth(jpeg(40, 40, value)) == faces


def test_jpeg_without_truth_has_no_comment() -> None:
    data = jpeg(16, 16, None)
    assert b"\xff\xfe" not in data.split(b"\xff\xda")[0]
    assert "comment" not in _decoded(data).info
    assert read_truth(data) is None


def test_truth_in_a_later_comment_and_after_idat() -> None:
    other = b"\xff\xfe" + struct.pack(">H", 2 + 5) + b"hello"
    base = jpeg(16, 16, "spoof")
    # A comment from another writer before ours: ours is still found, and the file still decodes.
    with_two = base[:2] + other + base[2:]
    assert _decoded(with_two).size == (16, 16)
    assert read_truth(with_two) == ["spoof"]

    # A text chunk after the pixel data is not seen from the headers alone, but it is once the image is loaded
    # (which the sandbox's upstream does anyway).
    plain = png(8, 8, None)
    late = plain[:-12] + _chunk(b"tEXt", TRUTH_KEYWORD.encode() + b"\x00live, live") + plain[-12:]
    assert read_truth(late) is None
    image = _decoded(late)
    assert image_truth_text(image) == "live, live"


@pytest.mark.parametrize("value", ["alive", "", "live,", "no_face,live", "LIVE", "live;spoof"])
def test_malformed_truth_is_none(value: str) -> None:
    assert read_truth(png(8, 8, value)) is None
    assert read_truth(jpeg(8, 8, value)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"plain text",
        b"GIF89a\x01\x00\x01\x00",
        b"\x89PNG\r\n\x1a\n\x00\x00",
        b"\xff\xd8\xff",
        b"BM" + bytes(60),
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 1 << 20, 1 << 20, 8, 0, 0, 0, 0)),
    ],
)
def test_truth_of_other_or_broken_data_is_none(data: bytes) -> None:
    assert read_truth(data) is None


def test_truth_survives_truncation() -> None:
    data = png(64, 64, "spoof")
    assert read_truth(data[: len(data) * 6 // 10]) == ["spoof"]
    data = jpeg(64, 64, "spoof")
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
        image = _decoded(sample.body)
        assert image.size == (256, 256), sample.key
        assert image.format == ("JPEG" if sample.key.endswith(".jpg") else "PNG")
        assert len(sample.body) < TEN_MIB
        faces = read_truth(sample.body)
        assert truth_verdict(fallback_truth(sample.body) if faces is None else faces) == sample.expected


def _opens(data: bytes) -> Image.Image | None:
    try:
        return Image.open(io.BytesIO(data))
    except OSError:
        return None


def test_corpus_rejected_samples(corpus: list[Sample]) -> None:
    bodies = [s.body for s in corpus if s.expected == "rejected"]
    assert len(bodies) == 5
    assert b"" in bodies
    assert next(s for s in corpus if s.body == b"").key.endswith(".jpg")
    text = [b for b in bodies if b and _opens(b) is None]
    assert len(text) == 1 and text[0].isascii()
    big = [b for b in bodies if len(b) > TEN_MIB]
    assert len(big) == 1 and len(big[0]) == OVERSIZED_BYTES
    assert _decoded(big[0]).size == (256, 256)
    small = [b for b in bodies if (image := _opens(b)) is not None and image.size == (16, 16)]
    assert len(small) == 1 and _decoded(small[0]).format == "PNG"
    # The truncated PNG still opens (its header is whole) but its pixels cannot be decoded.
    truncated = [b for b in bodies if (image := _opens(b)) is not None and image.size == (256, 256)]
    truncated = [b for b in truncated if len(b) < TEN_MIB]
    assert len(truncated) == 1 and not truncated[0].endswith(b"IEND\xaeB`\x82")
    with pytest.raises(OSError, match="truncated"):
        _decoded(truncated[0])


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
