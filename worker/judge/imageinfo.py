"""Image sniffing from leading and trailing bytes: format, dimensions, declared length, whether the end is intact."""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Enough to reach the SOF of a JPEG behind a typical EXIF/ICC block; one ranged GET, not the whole object.
HEAD_BYTES: int = 65536
# Enough for PNG's IEND chunk (12 bytes) with room for a little trailing padding.
TAIL_BYTES: int = 16
# A further read when a JPEG's frame header lies past the head: one JPEG segment is at most 64 KiB (plus its
# marker), so every such read gets past at least one segment.
MORE_BYTES: int = 65536
# Further reads allowed per object before its dimensions count as unknown: a hostile chain of maximal segments
# costs at most this many requests, and then the image is refused.
MAX_MORE_READS: int = 4

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
    # Set when the header walk ran out of bytes: the file offset it needs the bytes from to go on (see resume).
    more_at: int | None = None


def sniff(head: bytes) -> ImageInfo | None:
    """Identify an image from its leading bytes; None if it is not one of the accepted formats.

    Never raises: dimensions are None when the header is cut off or makes no sense.
    """
    if head.startswith(_PNG_SIGNATURE):
        return _png(head)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(head, base=0, pos=2)
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(head)
    if head.startswith(b"BM"):
        return _bmp(head)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head)
    return None


def resume(image: ImageInfo, data: bytes) -> ImageInfo:
    """Go on with a header walk that stopped at `image.more_at`, given the bytes of the file from that offset.

    Never raises; returns `image` unchanged when there is nothing to go on with.
    """
    if image.more_at is None or image.format != "jpeg":
        return image
    return _jpeg(data, base=image.more_at, pos=0)


def declared_length(fmt: str, head: bytes) -> int | None:
    """How long the header says the whole file is, for formats that say so (BMP, WEBP); None if unknown.

    These formats have no end marker, so comparing this with the object's size is how a truncation shows.
    """
    if fmt == "bmp":
        return _bmp_length(head)
    if fmt == "webp":
        return _webp_length(head)
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
    # BMP and WEBP have no end marker: declared_length() against the object's size is their check.
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


def _bmp_length(head: bytes) -> int | None:
    if len(head) < 6:
        return None
    file_size: int = struct.unpack("<I", head[2:6])[0]
    # Some writers leave the file size 0; the end of uncompressed pixel rows is a second, independent claim.
    claims = [n for n in (file_size, _bmp_pixels_end(head)) if n]
    return max(claims, default=None)


def _bmp_pixels_end(head: bytes) -> int | None:
    """Where the rows of an uncompressed BMP end: the pixel data offset plus the padded rows."""
    if len(head) < 26:
        return None
    offset, header_size = struct.unpack("<II", head[10:18])
    if header_size == 12:
        width, height, _planes, bits = struct.unpack("<HHHH", head[18:26])
        compression = 0
    elif header_size >= 40 and len(head) >= 34:
        width, height, _planes, bits, compression = struct.unpack("<iiHHI", head[18:34])
        height = abs(height)
    else:
        return None
    # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS store whole rows; RLE and embedded JPEG/PNG have no fixed length.
    if compression not in (0, 3, 6) or bits not in (1, 2, 4, 8, 16, 24, 32) or width <= 0 or height <= 0:
        return None
    stride = (width * bits + 31) // 32 * 4
    return int(offset + stride * height)


def _webp_length(head: bytes) -> int | None:
    if len(head) < 8:
        return None
    riff_size: int = struct.unpack("<I", head[4:8])[0]
    if len(head) < 20:
        return riff_size + 8
    # The first chunk must be whole even when the RIFF size understates the file.
    chunk_size: int = struct.unpack("<I", head[16:20])[0]
    return max(riff_size + 8, 20 + chunk_size)


def _jpeg(data: bytes, base: int, pos: int) -> ImageInfo:
    """Walk the segments of a JPEG from `pos` in `data`, which holds the file's bytes from offset `base` on.

    Every step moves `pos` forward, so the walk ends within len(data) steps whatever the bytes.
    """
    end = len(data)
    while True:
        if pos >= end:
            # The last segment reaches past the bytes at hand: the next one starts at pos.
            return ImageInfo("jpeg", None, None, more_at=base + pos)
        # Junk where a marker belongs is skipped up to the next 0xFF, as libjpeg and Pillow do (with a warning):
        # refusing such files would refuse images the upstream decodes.
        found = data.find(0xFF, pos)
        pos = end if found < 0 else found
        fill = pos
        # Any number of 0xFF fill bytes may precede a marker.
        while pos < end and data[pos] == 0xFF:
            pos += 1
        if pos >= end:
            # Out of bytes in junk or fill: go on from the last fill byte, which may prefix the marker.
            return ImageInfo("jpeg", None, None, more_at=base + max(fill, end - 1))
        marker = data[pos]
        pos += 1
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            # A stuffed zero belongs to junk, not to a marker; standalone markers have no length.
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            # A second SOI, EOI, or the start of scan data: no frame header before it.
            break
        # From the 0xFF before the marker, so that a further read starts at a segment boundary.
        segment = base + pos - 2
        if pos + 2 > end:
            return ImageInfo("jpeg", None, None, more_at=segment)
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            break
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                return ImageInfo("jpeg", None, None, more_at=segment)
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return ImageInfo("jpeg", *_dims(width, height))
        pos += length
    return ImageInfo("jpeg", None, None)
