"""Image sniffing from leading and trailing bytes: format, dimensions, and whether the end is intact."""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Enough to reach the SOF of a JPEG behind a typical EXIF/ICC block; one ranged GET, not the whole object.
HEAD_BYTES: int = 65536
# Enough for PNG's IEND chunk (12 bytes) with room for a little trailing padding.
TAIL_BYTES: int = 16

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
# SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}


@dataclass(frozen=True)
class ImageInfo:
    """What the first bytes say about an object: its format, and its size in pixels when it is known."""

    format: str  # "png" | "jpeg" | "gif" | "bmp" | "webp"
    width: int | None
    height: int | None


def sniff(head: bytes) -> ImageInfo | None:
    """Identify an image from its leading bytes; None if it is not one of the accepted formats.

    Never raises: dimensions are None when the header is cut off or makes no sense.
    """
    if head.startswith(_PNG_SIGNATURE):
        return _png(head)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(head)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(head)
    if head.startswith(b"BM"):
        return _bmp(head)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head)
    return None


def complete(fmt: str, tail: bytes) -> bool:
    """Whether the last bytes of an object look like the intact end of a `fmt` image.

    Catches truncated uploads from a ranged GET of the tail, without downloading the object.
    """
    if fmt == "png":
        return tail.endswith(_PNG_IEND)
    if fmt == "jpeg":
        # Some writers pad after EOI; padding is harmless, a missing EOI is not.
        return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if fmt == "gif":
        return tail.endswith(b"\x3b")
    # BMP and WEBP declare their length in the header; the caller checks that against the object size.
    return fmt in ("bmp", "webp")


def _dims(width: int, height: int) -> tuple[int | None, int | None]:
    if width <= 0 or height <= 0:
        return None, None
    return width, height


def _png(head: bytes) -> ImageInfo:
    if len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return ImageInfo("png", *_dims(width, height))
    return ImageInfo("png", None, None)


def _gif(head: bytes) -> ImageInfo:
    if len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
        return ImageInfo("gif", *_dims(width, height))
    return ImageInfo("gif", None, None)


def _bmp(head: bytes) -> ImageInfo:
    if len(head) >= 18:
        (header_size,) = struct.unpack("<I", head[14:18])
        if header_size == 12 and len(head) >= 22:
            # OS/2 BITMAPCOREHEADER: unsigned 16-bit sizes.
            width, height = struct.unpack("<HH", head[18:22])
            return ImageInfo("bmp", *_dims(width, height))
        if header_size >= 40 and len(head) >= 26:
            width, height = struct.unpack("<ii", head[18:26])
            # A negative height only means the rows are stored top-down.
            return ImageInfo("bmp", *_dims(width, abs(height)))
    return ImageInfo("bmp", None, None)


def _webp(head: bytes) -> ImageInfo:
    chunk = head[12:16]
    data = head[20:]
    if chunk == b"VP8X" and len(data) >= 10:
        width = int.from_bytes(data[4:7], "little") + 1
        height = int.from_bytes(data[7:10], "little") + 1
        return ImageInfo("webp", *_dims(width, height))
    if chunk == b"VP8 " and len(data) >= 10 and data[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[6:10])
        return ImageInfo("webp", *_dims(width & 0x3FFF, height & 0x3FFF))
    if chunk == b"VP8L" and len(data) >= 5 and data[0] == 0x2F:
        (bits,) = struct.unpack("<I", data[1:5])
        return ImageInfo("webp", *_dims((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
    return ImageInfo("webp", None, None)


def _jpeg(head: bytes) -> ImageInfo:
    pos = 2
    end = len(head)
    while pos < end:
        if head[pos] != 0xFF:
            # Not at a marker: garbage between segments, so anything further would be a guess.
            break
        # Any number of 0xFF fill bytes may precede a marker.
        while pos < end and head[pos] == 0xFF:
            pos += 1
        if pos >= end:
            break
        marker = head[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0x00, 0xD8, 0xD9, 0xDA):
            # A stuffed zero, a second SOI, EOI, or the start of scan data: no frame header before it.
            break
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", head[pos : pos + 2])
        if length < 2:
            break
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                break
            height, width = struct.unpack(">HH", head[pos + 3 : pos + 7])
            return ImageInfo("jpeg", *_dims(width, height))
        pos += length
    return ImageInfo("jpeg", None, None)
