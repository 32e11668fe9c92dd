"""The ground truth the sandbox judges by: per-face labels stored inside an image's bytes."""

from __future__ import annotations

import hashlib
import io
import struct

from PIL import Image, JpegImagePlugin, PngImagePlugin

TRUTH_KEYWORD = "irlive-truth"
LABELS = ("live", "spoof")
NO_FACE = "no_face"

# A truth value that makes the upstream refuse the image as undecodable although its header and end are fine:
# the one failure pre-validation cannot see, which is what batch splitting is for.
UNDECODABLE = "undecodable"

_COMMENT_PREFIX = TRUTH_KEYWORD + "="
# What Pillow raises for data that only starts like an image (or not even that).
_UNREADABLE = (OSError, ValueError, EOFError, SyntaxError, struct.error, Image.DecompressionBombError)


def parse_truth(value: str) -> list[str] | None:
    """Per-face labels from a truth value ("live", "spoof", "no_face", "live,spoof"); None if malformed."""
    value = value.strip()
    if value == NO_FACE:
        return []
    faces = [part.strip() for part in value.split(",")]
    if not all(face in LABELS for face in faces):
        return None
    return faces


def truth_text(data: bytes) -> str | None:
    """The raw truth value stored in a PNG or JPEG, if any.

    Only the headers are read, never the pixels: cheap even for a 12 MB file, and it works on a truncated one.
    A PNG text chunk placed after the image data is seen only by `image_truth_text` on a loaded image.
    """
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as image:
            return image_truth_text(image)
    except _UNREADABLE:
        return None


def image_truth_text(image: Image.Image) -> str | None:
    """The raw truth value of an opened image: a PNG text chunk `irlive-truth`, or a JPEG comment
    `irlive-truth=<value>` (the first such of several comments)."""
    if isinstance(image, JpegImagePlugin.JpegImageFile):
        for marker, content in image.applist:
            if marker == "COM":
                text = content.decode("utf-8", errors="replace").rstrip("\x00")
                if text.startswith(_COMMENT_PREFIX):
                    return text[len(_COMMENT_PREFIX) :]
        return None
    if isinstance(image, PngImagePlugin.PngImageFile):
        # Pillow fills `info` with the text chunks read so far: those before IDAT, and after load() all of them.
        value = image.info.get(TRUTH_KEYWORD)
        return value if isinstance(value, str) else None
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
