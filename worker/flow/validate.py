"""Checks an object before any money moves: size, format by magic bytes, dimensions, an intact end."""

from __future__ import annotations

from dataclasses import dataclass

from worker.errors import PermanentInputError
from worker.judge import imageinfo
from worker.seams.storage import ObjectInfo, Storage

# The upstream recommends at least this; smaller images are judged but flagged in their record.
RECOMMENDED_SIDE = 256


def small_image_warning(image: imageinfo.ImageInfo) -> str | None:
    if image.width is None or image.height is None or min(image.width, image.height) >= RECOMMENDED_SIDE:
        return None
    return (f"image is {image.width}x{image.height}; the upstream recommends at least "
            f"{RECOMMENDED_SIDE}x{RECOMMENDED_SIDE}, so its verdict is less reliable")


@dataclass(frozen=True)
class Limits:
    """What the upstream accepts (and what we choose to insist on)."""

    max_bytes: int = 10 * 1024 * 1024
    min_side: int = 64
    max_side: int = 4096


def validate(storage: Storage, bucket: str, key: str, limits: Limits) -> tuple[ObjectInfo, imageinfo.ImageInfo]:
    """The first bytes (with size and ETag), then the last ones if needed; PermanentInputError says why not."""
    info, head = storage.read_head(bucket, key, imageinfo.HEAD_BYTES)
    if info.size == 0:
        raise PermanentInputError("the object is empty (0 bytes)", code="empty")
    if info.size > limits.max_bytes:
        raise PermanentInputError(
            f"the object is {info.size} bytes; the upstream accepts at most {limits.max_bytes}", code="too_large"
        )
    image = imageinfo.sniff(head)
    if image is None:
        raise PermanentInputError("not an image: no PNG/JPEG/GIF/BMP/WEBP signature", code="not_an_image")
    if image.width is not None and image.height is not None and min(image.width, image.height) < limits.min_side:
        raise PermanentInputError(
            f"image is {image.width}x{image.height}; at least {limits.min_side}x{limits.min_side} required "
            "(IRLIVE_MIN_IMAGE_SIDE)", code="too_small"
        )
    tail = head[-imageinfo.TAIL_BYTES:] if info.size <= len(head) else storage.read_range(
        bucket, key, f"bytes=-{imageinfo.TAIL_BYTES}", etag=info.etag)
    if not imageinfo.complete(image.format, tail):
        raise PermanentInputError(f"the {image.format} file is truncated (no end marker)", code="truncated")
    return info, image
