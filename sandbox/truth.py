"""The ground truth the sandbox judges by: per-face labels stored inside an image's bytes."""

from __future__ import annotations

import hashlib
import struct

TRUTH_KEYWORD = "irlive-truth"
LABELS = ("live", "spoof")
NO_FACE = "no_face"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse_truth(value: str) -> list[str] | None:
    """Per-face labels from a truth value ("live", "spoof", "no_face", "live,spoof"); None if malformed."""
    value = value.strip()
    if value == NO_FACE:
        return []
    faces = [part.strip() for part in value.split(",")]
    if not all(face in LABELS for face in faces):
        return None
    return faces


# A truth value that makes the upstream refuse the image as undecodable although its header and end are fine:
# the one failure pre-validation cannot see, which is what batch splitting is for.
UNDECODABLE = "undecodable"


def truth_text(data: bytes) -> str | None:
    """The raw truth value stored in the image, if any."""
    if data.startswith(_PNG_SIGNATURE):
        return _png_text(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_comment(data)
    return None


def read_truth(data: bytes) -> list[str] | None:
    """The per-face labels stored in a PNG tEXt chunk or a JPEG COM segment; None if absent or malformed.

    An empty list means the image is known to hold no face.
    """
    value = truth_text(data)
    return None if value is None else parse_truth(value)


def fallback_truth(data: bytes) -> list[str]:
    """Labels for an image with no stored truth: stable per content, ~70 % live, 20 % spoof, 10 % none."""
    roll = int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % 100
    if roll < 70:
        return ["live"]
    if roll < 90:
        return ["spoof"]
    return []


def truth_verdict(faces: list[str]) -> str:
    """The image-level verdict of per-face labels, by the same rule as the worker: any spoof face wins."""
    if not faces:
        return "no_face"
    if "spoof" in faces:
        return "spoof"
    return "live"


def _png_text(data: bytes) -> str | None:
    pos = len(_PNG_SIGNATURE)
    keyword = TRUTH_KEYWORD.encode("latin-1") + b"\x00"
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            break
        if kind == b"tEXt":
            body = data[pos + 8 : pos + 8 + length]
            if body.startswith(keyword):
                return body[len(keyword) :].decode("latin-1")
        pos += 12 + length
    return None


def _jpeg_comment(data: bytes) -> str | None:
    prefix = TRUTH_KEYWORD + "="
    pos = 2
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            break
        while pos < end and data[pos] == 0xFF:
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        if marker in (0x00, 0xD9, 0xDA):
            # A comment after the scan data would need an entropy-coded scan; writers put theirs before it.
            break
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            break
        if marker == 0xFE:
            text = data[pos + 2 : pos + length].decode("utf-8", errors="replace").rstrip("\x00")
            if text.startswith(prefix):
                return text[len(prefix) :]
        pos += length
    return None
