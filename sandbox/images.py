"""Synthetic infrared-looking face captures (PNG and JPEG, drawn with Pillow) and the demo corpus built from them."""

from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageChops, ImageDraw, PngImagePlugin

from sandbox.truth import TRUTH_KEYWORD, fallback_truth, parse_truth, truth_verdict

# The worker's size limit is 10 MiB; the oversized sample must clear it by a wide margin.
OVERSIZED_BYTES = 12 * 1024 * 1024

# Sensor noise is the low 4 bits of a random byte: enough texture to look like a sensor, little enough that
# the face stays obvious.
_NOISE_TABLE = bytes(i & 0x0F for i in range(256))
_JPEG_QUALITY = 85
# A private, ancillary, safe-to-copy PNG chunk type: decoders skip it, so padding keeps the file valid.
_PADDING_CHUNK = b"irPd"
_CHUNK_OVERHEAD = 12  # length, type and CRC around a PNG chunk's data

# Brightness levels (before noise) of the picture's parts.
_EYE = 45  # eyes absorb near-infrared and come out dark
_MOUTH = 80
_LIVE_SKIN = (110, 140, 168)  # live skin under IR illumination: bright, warmest towards the centre
_SPOOF_SKIN = (118, 126, 132)  # a photo or a screen reflects infrared flatly
_SCREEN = 70
_BEZEL = 150


@dataclass(frozen=True)
class Sample:
    """One object of the demo corpus and the verdict the whole pipeline must end with for it."""

    key: str
    body: bytes
    expected: str  # "live" | "spoof" | "no_face" | "rejected"


# --- picture ----------------------------------------------------------------------------------------------


def _box(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    return cx - rx, cy - ry, cx + rx, cy + ry


def _draw_face(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, label: str) -> None:
    if label == "spoof":
        # A held-up photo or phone: a rectangular frame with a bright bezel around a flatly lit face.
        bezel = max(1, round(rx * 0.06))
        draw.rectangle(_box(cx, cy, rx * 1.25, ry * 1.2), fill=_SCREEN, outline=_BEZEL, width=bezel)
        levels = _SPOOF_SKIN
    else:
        levels = _LIVE_SKIN
    draw.ellipse(_box(cx, cy, rx, ry), fill=levels[0])
    draw.ellipse(_box(cx, cy, rx * 0.75, ry * 0.78), fill=levels[1])
    draw.ellipse(_box(cx, cy + ry * 0.05, rx * 0.45, ry * 0.5), fill=levels[2])
    for side in (-1, 1):
        draw.ellipse(_box(cx + side * rx * 0.38, cy - ry * 0.18, rx * 0.17, ry * 0.08), fill=_EYE)
    draw.ellipse(_box(cx, cy + ry * 0.45, rx * 0.3, ry * 0.06), fill=_MOUTH)


def _render(width: int, height: int, faces: list[str], seed: int) -> Image.Image:
    """An 8-bit gray picture: a dark noisy background with one bright face per label, side by side."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rng = random.Random(seed)
    canvas = Image.frombytes("L", (1, height), _falloff(height)).resize((width, height), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    slot = width / max(1, len(faces))
    for i, label in enumerate(faces):
        cx = slot * (i + 0.5) + rng.uniform(-0.05, 0.05) * slot
        cy = height * (0.5 + rng.uniform(-0.05, 0.05))
        rx = slot * rng.uniform(0.26, 0.32)
        ry = min(height * rng.uniform(0.34, 0.4), rx * 1.45)
        _draw_face(draw, cx, cy, rx, ry, label)
    noise = Image.frombytes("L", (width, height), rng.randbytes(width * height).translate(_NOISE_TABLE))
    return ImageChops.add(canvas, noise)


@lru_cache(maxsize=64)
def _falloff(height: int) -> bytes:
    # A faint vertical falloff, like an IR illuminator aimed at head height.
    return bytes(14 + (12 * y) // height for y in range(height))


def _faces_of(truth: str | None) -> list[str]:
    # An image without a stored truth still shows one face; the sandbox judges it by the fallback.
    if truth is None:
        return ["live"]
    faces = parse_truth(truth)
    return ["live"] if faces is None else faces


# --- encoders ---------------------------------------------------------------------------------------------


def _png_bytes(picture: Image.Image, truth: str | None, padding: int | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if truth is not None:
        info.add_text(TRUTH_KEYWORD, truth)
    if padding is not None:
        # After IDAT, so that opening the file (to read its truth) never reads through the padding.
        info.add(_PADDING_CHUNK, bytes(padding), after_idat=True)
    out = io.BytesIO()
    # Sensor noise leaves LZ77 nothing to find: Huffman coding alone gives the same size in half the time.
    picture.save(out, "PNG", pnginfo=info, compress_type=zlib.Z_HUFFMAN_ONLY)
    return out.getvalue()


def png(width: int, height: int, truth: str | None, seed: int = 0, pad_to: int = 0) -> bytes:
    """An 8-bit grayscale PNG face capture, with a tEXt chunk `irlive-truth` = `truth` unless it is None.

    `pad_to` grows the file to at least that many bytes (exactly that many if the image is 12 or more bytes
    short of it) with a private ancillary chunk before IEND: still a valid, fully decodable PNG.
    """
    picture = _render(width, height, _faces_of(truth), seed)
    data = _png_bytes(picture, truth)
    if pad_to > len(data):
        # The encoding is deterministic, so the second one differs from the first only by the padding chunk.
        data = _png_bytes(picture, truth, padding=max(0, pad_to - len(data) - _CHUNK_OVERHEAD))
    return data


def jpeg(width: int, height: int, truth: str | None, seed: int = 0) -> bytes:
    """A baseline grayscale JPEG face capture, with a COM segment `irlive-truth=<truth>` unless it is None."""
    picture = _render(width, height, _faces_of(truth), seed)
    comment = None if truth is None else f"{TRUTH_KEYWORD}={truth}".encode()
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=_JPEG_QUALITY, comment=comment)
    return out.getvalue()


# --- demo corpus ------------------------------------------------------------------------------------------

_DATES = ("2026-11-21", "2026-11-22", "2026-11-23")


@dataclass(frozen=True)
class _Plan:
    truth: str | None
    fmt: str  # "png" | "jpeg"
    name: str  # "{seq}" is replaced by the sequence number


def _plans(count: int, rng: random.Random) -> list[_Plan]:
    """What each valid sample will be; the awkward cases come first so that small corpora still hold them."""
    # Two faces with a spoof among them is a spoof; two live faces are live; two unlabelled ones use the
    # sandbox's fallback.
    truths: list[str | None] = ["live,spoof", "live,live", "live,spoof", None, None, "no_face", "spoof"]
    names = ["img {seq}.png", "img+{seq}.png", "Müller_{seq}.png"]
    plans: list[_Plan] = []
    for i in range(count):
        if i < len(truths):
            truth = truths[i]
        else:
            roll = rng.random()
            truth = "live" if roll < 0.62 else "spoof" if roll < 0.87 else "no_face"
        # Every tenth is a JPEG, offset so that even a small corpus has one.
        fmt = "jpeg" if i % 10 == 4 else "png"
        name = names[i] if i < len(names) else "img_{seq}.png"
        if fmt == "jpeg":
            name = name.removesuffix(".png") + ".jpg"
        plans.append(_Plan(truth, fmt, name))
    return plans


def demo_corpus(n: int = 200, seed: int = 7, prefix: str = "captures") -> list[Sample]:
    """`n` samples for the demo, the tests and the benchmarks, the same ones for the same seed.

    Mostly 256x256 live/spoof/no-face PNGs, about 10 % JPEGs, a few two-face images, keys with a space,
    a '+' and a non-ASCII letter, and exactly five objects the worker must reject before paying: a text
    file named .png, a truncated PNG, a 12 MiB PNG, a 16x16 PNG and an empty .jpg.
    """
    rng = random.Random(seed)
    whole = png(256, 256, "live", seed=seed * 1000 + 1)
    # Each invalid object fails exactly one pre-validation check.
    invalid: list[tuple[str, bytes]] = [
        ("notes_{seq}.png", b"camera 3 heartbeat ok\nuptime 41d\nthis is not an image\n"),
        ("img_{seq}.png", whole[: len(whole) * 6 // 10]),
        ("img_{seq}.png", png(256, 256, "live", seed=seed * 1000 + 2, pad_to=OVERSIZED_BYTES)),
        ("thumb_{seq}.png", png(16, 16, "live", seed=seed * 1000 + 3)),
        ("img_{seq}.jpg", b""),
    ]
    if n < len(invalid):
        raise ValueError(f"a demo corpus holds at least {len(invalid)} samples, asked for {n}")

    entries: list[_Plan | tuple[str, bytes]] = [*_plans(n - len(invalid), rng), *invalid]
    rng.shuffle(entries)

    base = prefix.strip("/")
    samples: list[Sample] = []
    for seq, entry in enumerate(entries, start=1):
        folder = f"{_DATES[rng.randrange(len(_DATES))]}/cam{rng.randrange(1, 9):02d}"
        if isinstance(entry, _Plan):
            make = jpeg if entry.fmt == "jpeg" else png
            body = make(256, 256, entry.truth, seed=seed * 100_000 + seq)
            faces = fallback_truth(body) if entry.truth is None else _faces_of(entry.truth)
            name, expected = entry.name, truth_verdict(faces)
        else:
            (name, body), expected = entry, "rejected"
        key = f"{folder}/{name.format(seq=f'{seq:06d}')}"
        samples.append(Sample(key=f"{base}/{key}" if base else key, body=body, expected=expected))
    return samples
