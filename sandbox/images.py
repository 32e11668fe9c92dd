"""Synthetic infrared-looking face captures (PNG and baseline JPEG) and the demo corpus built from them."""

from __future__ import annotations

import math
import random
import struct
import zlib
from dataclasses import dataclass
from functools import cache

from sandbox.truth import TRUTH_KEYWORD, fallback_truth, parse_truth, truth_verdict

# The worker's size limit is 10 MiB; the oversized sample must clear it by a wide margin.
OVERSIZED_BYTES = 12 * 1024 * 1024

# Noise amplitude is the low 4 bits of a random byte: enough texture to look like a sensor, little enough
# that the face stays obvious.
_NOISE_MASK = 0x0F


@dataclass(frozen=True)
class Sample:
    """One object of the demo corpus and the verdict the whole pipeline must end with for it."""

    key: str
    body: bytes
    expected: str  # "live" | "spoof" | "no_face" | "rejected"


# --- raster -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """An ellipse (or an axis-aligned rectangle) painted at one brightness level."""

    cx: float
    cy: float
    rx: float
    ry: float
    level: int
    rect: bool = False

    def span(self, y: float) -> tuple[float, float] | None:
        dy = (y - self.cy) / self.ry if self.ry > 0 else 2.0
        if abs(dy) >= 1.0:
            return None
        half = self.rx if self.rect else self.rx * math.sqrt(1.0 - dy * dy)
        return self.cx - half, self.cx + half


@cache
def _level_table(level: int) -> bytes:
    # A translate table turning a random byte into level + small noise, so a whole span is one C call.
    return bytes(min(255, level + (i & _NOISE_MASK)) for i in range(256))


def _face_shapes(cx: float, cy: float, rx: float, ry: float, label: str) -> list[_Shape]:
    if label == "spoof":
        # A held-up photo or screen: a visible frame, and skin that reflects infrared flatly.
        frame = _Shape(cx, cy, rx * 1.25, ry * 1.2, 70, rect=True)
        levels = (118, 126, 132)
        shapes = [frame]
    else:
        # Live skin under IR illumination: bright, warmest towards the centre.
        levels = (110, 140, 168)
        shapes = []
    shapes += [
        _Shape(cx, cy, rx, ry, levels[0]),
        _Shape(cx, cy, rx * 0.75, ry * 0.78, levels[1]),
        _Shape(cx, cy + ry * 0.05, rx * 0.45, ry * 0.5, levels[2]),
        # Eyes absorb near-infrared and come out dark.
        _Shape(cx - rx * 0.38, cy - ry * 0.18, rx * 0.17, ry * 0.08, 45),
        _Shape(cx + rx * 0.38, cy - ry * 0.18, rx * 0.17, ry * 0.08, 45),
        _Shape(cx, cy + ry * 0.45, rx * 0.3, ry * 0.06, 80),
    ]
    return shapes


def _raster(width: int, height: int, faces: list[str], seed: int) -> list[bytes]:
    """Rows of 8-bit gray pixels: a dark noisy background with one bright face blob per label."""
    rng = random.Random(seed)
    noise = rng.randbytes(width * 2 + 64)
    shapes: list[_Shape] = []
    count = len(faces)
    for i, label in enumerate(faces):
        slot = width / count
        cx = slot * (i + 0.5) + rng.uniform(-0.05, 0.05) * slot
        cy = height * (0.5 + rng.uniform(-0.05, 0.05))
        rx = slot * rng.uniform(0.26, 0.32)
        ry = min(height * rng.uniform(0.34, 0.4), rx * 1.45)
        shapes += _face_shapes(cx, cy, rx, ry, label)
    rows: list[bytes] = []
    for y in range(height):
        start = rng.randrange(len(noise) - width)
        row_noise = noise[start : start + width]
        # A faint vertical falloff, like an IR illuminator aimed at head height.
        row = bytearray(row_noise.translate(_level_table(14 + (12 * y) // max(1, height))))
        for shape in shapes:
            span = shape.span(y + 0.5)
            if span is None:
                continue
            a = max(0, round(span[0]))
            b = min(width, round(span[1]))
            if a < b:
                row[a:b] = row_noise[a:b].translate(_level_table(shape.level))
        rows.append(bytes(row))
    return rows


def _faces_of(truth: str | None) -> list[str]:
    # An image without a stored truth still shows one face; the sandbox judges it by the fallback.
    if truth is None:
        return ["live"]
    faces = parse_truth(truth)
    return ["live"] if faces is None else faces


# --- PNG --------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, truth: str | None, seed: int = 0, pad_to: int = 0) -> bytes:
    """An 8-bit grayscale PNG face capture, with a tEXt chunk `irlive-truth` = `truth` unless it is None.

    `pad_to` grows the file to at least that many bytes with a private ancillary chunk: still a valid PNG.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rows = _raster(width, height, _faces_of(truth), seed)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    parts = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", ihdr)]
    if truth is not None:
        parts.append(_png_chunk(b"tEXt", TRUTH_KEYWORD.encode("latin-1") + b"\x00" + truth.encode("latin-1")))
    # Filter type 0 on every row: the noise defeats the other filters anyway.
    parts.append(_png_chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + row for row in rows), 6)))
    iend = _png_chunk(b"IEND", b"")
    size = sum(len(p) for p in parts) + len(iend)
    if pad_to > size:
        padding = pad_to - size - 12
        parts.append(_png_chunk(b"irPd", bytes(max(0, padding))))
    parts.append(iend)
    return b"".join(parts)


# --- JPEG -------------------------------------------------------------------------------------------------

_LUMA_QUANT = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
_DC_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)
_DC_VALUES = tuple(range(12))
_AC_BITS = (0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D)
_AC_VALUES = (
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7,
    0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5,
    0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2,
    0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
)  # fmt: skip
# Scale factors of the AAN fast DCT: its outputs come out multiplied by these (per axis) and by 8.
_AAN_SCALE = (1.0, 1.387039845, 1.306562965, 1.175875602, 1.0, 0.785694958, 0.541196100, 0.275899379)
_JPEG_QUALITY = 85


def _zigzag() -> tuple[int, ...]:
    order: list[int] = []
    for s in range(15):
        rows = range(max(0, s - 7), min(s, 7) + 1)
        for i in rows if s % 2 else reversed(rows):
            order.append(i * 8 + (s - i))
    return tuple(order)


_ZIGZAG = _zigzag()


def _huffman_codes(bits: tuple[int, ...], values: tuple[int, ...]) -> dict[int, tuple[int, int]]:
    codes: dict[int, tuple[int, int]] = {}
    code = 0
    k = 0
    for length in range(1, 17):
        for _ in range(bits[length - 1]):
            codes[values[k]] = (code, length)
            code += 1
            k += 1
        code <<= 1
    return codes


def _quant_table(quality: int) -> tuple[int, ...]:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return tuple(min(255, max(1, (q * scale + 50) // 100)) for q in _LUMA_QUANT)


# Index octets of the 8 rows then the 8 columns of a block: the 2-D DCT is the 1-D one over each.
_DCT_LINES = tuple(tuple(r * 8 + k for k in range(8)) for r in range(8)) + tuple(
    tuple(c + 8 * k for k in range(8)) for c in range(8)
)


def _fdct(d: list[float]) -> None:
    """In-place AAN forward DCT of an 8x8 block (libjpeg's jfdctflt); outputs scaled by _AAN_SCALE and 8."""
    for i0, i1, i2, i3, i4, i5, i6, i7 in _DCT_LINES:
        tmp0 = d[i0] + d[i7]
        tmp7 = d[i0] - d[i7]
        tmp1 = d[i1] + d[i6]
        tmp6 = d[i1] - d[i6]
        tmp2 = d[i2] + d[i5]
        tmp5 = d[i2] - d[i5]
        tmp3 = d[i3] + d[i4]
        tmp4 = d[i3] - d[i4]

        tmp10 = tmp0 + tmp3
        tmp13 = tmp0 - tmp3
        tmp11 = tmp1 + tmp2
        tmp12 = tmp1 - tmp2
        d[i0] = tmp10 + tmp11
        d[i4] = tmp10 - tmp11
        z1 = (tmp12 + tmp13) * 0.707106781
        d[i2] = tmp13 + z1
        d[i6] = tmp13 - z1

        tmp10 = tmp4 + tmp5
        tmp11 = tmp5 + tmp6
        tmp12 = tmp6 + tmp7
        z5 = (tmp10 - tmp12) * 0.382683433
        z2 = 0.541196100 * tmp10 + z5
        z4 = 1.306562965 * tmp12 + z5
        z3 = tmp11 * 0.707106781
        z11 = tmp7 + z3
        z13 = tmp7 - z3
        d[i5] = z13 + z2
        d[i3] = z13 - z2
        d[i1] = z11 + z4
        d[i7] = z11 - z4


def _jpeg_segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def _dht(table_class: int, table_id: int, bits: tuple[int, ...], values: tuple[int, ...]) -> bytes:
    return _jpeg_segment(0xC4, bytes([table_class << 4 | table_id, *bits, *values]))


def _scan(rows: list[bytes], width: int, height: int, quant: tuple[int, ...]) -> bytes:
    """Entropy-coded data of one grayscale baseline scan, byte-stuffed, padded with 1 bits."""
    dc_codes = _huffman_codes(_DC_BITS, _DC_VALUES)
    ac_codes = _huffman_codes(_AC_BITS, _AC_VALUES)
    # One multiplier per zigzag position undoes the AAN scaling and applies the quantizer in one step.
    factors = [1.0 / (quant[n] * _AAN_SCALE[n // 8] * _AAN_SCALE[n % 8] * 8.0) for n in _ZIGZAG]
    zigzag = _ZIGZAG
    eob = ac_codes[0x00]
    zrl = ac_codes[0xF0]

    # Replicate the last column and row so the image fills whole 8x8 blocks, as decoders expect.
    padded_w = (width + 7) // 8 * 8
    padded_h = (height + 7) // 8 * 8
    rows = [row + row[-1:] * (padded_w - width) for row in rows]
    rows += [rows[-1]] * (padded_h - height)

    out = bytearray()
    acc = 0
    nbits = 0

    def emit(code: int, length: int) -> None:
        nonlocal acc, nbits
        acc = (acc << length) | code
        nbits += length
        while nbits >= 8:
            nbits -= 8
            byte = (acc >> nbits) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)
        acc &= (1 << nbits) - 1

    previous_dc = 0
    for by in range(0, padded_h, 8):
        strip = rows[by : by + 8]
        for bx in range(0, padded_w, 8):
            block: list[float] = []
            for row in strip:
                block.extend(row[bx : bx + 8])
            _fdct(block)
            # Level shift by -128 folded in after the transform: it only moves the DC term, by 128 * 64.
            block[0] -= 8192.0
            coefs = [round(block[n] * f) for n, f in zip(zigzag, factors, strict=True)]

            dc = coefs[0]
            diff = dc - previous_dc
            previous_dc = dc
            size = abs(diff).bit_length()
            emit(*dc_codes[size])
            if size:
                emit(diff if diff > 0 else diff + (1 << size) - 1, size)

            run = 0
            for k in range(1, 64):
                value = coefs[k]
                if value == 0:
                    run += 1
                    continue
                while run > 15:
                    emit(*zrl)
                    run -= 16
                size = abs(value).bit_length()
                emit(*ac_codes[(run << 4) | size])
                emit(value if value > 0 else value + (1 << size) - 1, size)
                run = 0
            if run:
                emit(*eob)
    if nbits:
        emit((1 << (8 - nbits)) - 1, 8 - nbits)
    return bytes(out)


def jpeg(width: int, height: int, truth: str | None, seed: int = 0) -> bytes:
    """A baseline grayscale JPEG face capture, with a COM segment `irlive-truth=<truth>` unless it is None."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rows = _raster(width, height, _faces_of(truth), seed)
    quant = _quant_table(_JPEG_QUALITY)
    parts = [
        b"\xff\xd8",
        _jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
    ]
    if truth is not None:
        parts.append(_jpeg_segment(0xFE, f"{TRUTH_KEYWORD}={truth}".encode()))
    parts += [
        _jpeg_segment(0xDB, bytes([0x00, *(quant[n] for n in _ZIGZAG)])),
        # 8-bit precision, one component (id 1, no subsampling, quant table 0).
        _jpeg_segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])),
        _dht(0, 0, _DC_BITS, _DC_VALUES),
        _dht(1, 0, _AC_BITS, _AC_VALUES),
        # One component using DC/AC tables 0, full spectral range, no successive approximation.
        _jpeg_segment(0xDA, bytes([1, 1, 0x00, 0, 63, 0])),
        _scan(rows, width, height, quant),
        b"\xff\xd9",
    ]
    return b"".join(parts)


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
