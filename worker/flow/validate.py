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
    """The first bytes (with size and ETag), then the last ones if needed; PermanentInputError says why not.

    One request for an object within HEAD_BYTES, two above it; a JPEG whose frame header lies past the head
    costs at most MAX_MORE_READS more, which may also bring its end.
    """
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
    whole = info.size <= len(head)
    tail = head[-imageinfo.TAIL_BYTES:] if whole else None
    if image.more_at is not None:
        image, far_tail = _read_on(storage, bucket, info, image, whole)
        tail = tail if far_tail is None else far_tail
    declared = imageinfo.declared_length(image.format, head)
    if declared is not None and declared > info.size:
        raise PermanentInputError(
            f"the {image.format} file is truncated: its header declares {declared} bytes, the object has {info.size}",
            code="truncated",
        )
    _check_dimensions(image, limits)
    if tail is None:
        tail = storage.read_range(bucket, key, f"bytes=-{imageinfo.TAIL_BYTES}", etag=info.etag)
    if not imageinfo.complete(image.format, tail):
        raise PermanentInputError(f"the {image.format} file is truncated (no end marker)", code="truncated")
    return info, image


def _read_on(storage: Storage, bucket: str, info: ObjectInfo, image: imageinfo.ImageInfo,
             whole: bool) -> tuple[imageinfo.ImageInfo, bytes | None]:
    """Follow a header walk past the head (`whole`: the head was the entire object), in a bounded number of
    ranged reads of the same version.

    Returns the image as far as it could be read, and the object's last bytes if a read brought them.
    """
    # Whether the bytes the walk ran out of ended at the object's end: then no read can help.
    at_end = whole
    tail: bytes | None = None
    reads = 0
    while image.more_at is not None:
        if at_end or image.more_at >= info.size:
            raise PermanentInputError(
                f"the {image.format} file is truncated: its header runs past the end of the object ({info.size} bytes)",
                code="truncated",
            )
        if reads == imageinfo.MAX_MORE_READS:
            break
        start = image.more_at
        stop = min(start + imageinfo.MORE_BYTES, info.size)
        # Pinned to the ETag of the head: a replaced object fails as not_found instead of mixing two versions.
        data = storage.read_range(bucket, info.key, f"bytes={start}-{stop - 1}", etag=info.etag)
        reads += 1
        at_end = start + len(data) >= info.size
        if at_end and len(data) >= imageinfo.TAIL_BYTES:
            # This read brought the object's end: the end check needs no request of its own.
            tail = data[-imageinfo.TAIL_BYTES:]
        image = imageinfo.resume(image, data)
    return image, tail


def _check_dimensions(image: imageinfo.ImageInfo, limits: Limits) -> None:
    if image.width is None or image.height is None:
        reach = "" if image.more_at is None else (
            f" within its first {image.more_at} bytes ({imageinfo.MAX_MORE_READS} further reads)")
        raise PermanentInputError(
            f"the {image.format} header does not give the image's dimensions{reach}; "
            "refused rather than paid for unchecked", code="unknown_dimensions"
        )
    if max(image.width, image.height) > limits.max_side:
        raise PermanentInputError(
            f"image is {image.width}x{image.height}; at most {limits.max_side} pixels a side accepted "
            "(IRLIVE_MAX_IMAGE_SIDE)", code="too_large_dimensions"
        )
    if min(image.width, image.height) < limits.min_side:
        raise PermanentInputError(
            f"image is {image.width}x{image.height}; at least {limits.min_side}x{limits.min_side} required "
            "(IRLIVE_MIN_IMAGE_SIDE)", code="too_small"
        )
