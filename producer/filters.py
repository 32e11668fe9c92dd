"""Which listed objects are images to judge (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only the type: importing worker.seams.storage at run time would pull in boto3
    from worker.seams.storage import ObjectInfo

DEFAULT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def parse_suffixes(text: str | None) -> tuple[str, ...]:
    """'.png,jpg' -> ('.png', '.jpg'); empty or None -> the image defaults."""
    if not text:
        return DEFAULT_SUFFIXES
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    return tuple(p if p.startswith(".") else "." + p for p in parts) or DEFAULT_SUFFIXES


def is_image_key(key: str, suffixes: tuple[str, ...], exclude_prefix: str | None = None) -> bool:
    """An image suffix, not a folder marker, not under exclude_prefix (our own output)."""
    # A folder, not a name prefix: excluding "runs" must not drop "runs-2024/a.png".
    folder = exclude_prefix.rstrip("/") + "/" if exclude_prefix else None
    if key.endswith("/") or (folder and key.startswith(folder)):
        return False
    return key.lower().endswith(suffixes)


def image_objects(objects: Iterable[ObjectInfo], suffixes: tuple[str, ...],
                  exclude_prefix: str | None = None) -> Iterator[ObjectInfo]:
    """Keep keys with an image suffix; drop folder markers and anything under exclude_prefix (our output)."""
    return (obj for obj in objects if is_image_key(obj.key, suffixes, exclude_prefix))
