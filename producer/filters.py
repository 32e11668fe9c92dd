"""Which listed objects are images to judge (pure)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from worker.errors import ConfigError

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


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now: datetime, flag: str = "--since") -> datetime:
    """'2026-11-29', '2026-11-29T10:00:00Z' (no zone: UTC) or a span back from now ('24h', '7d') -> UTC."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value.lower())
    if relative:
        return now - timedelta(seconds=float(relative[1]) * _UNITS[relative[2]])
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected an ISO-8601 time (2026-11-29, 2026-11-29T10:00:00Z) or a "
                          "span back from now (90m, 24h, 7d)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def modified_between(last_modified: datetime | None, lower: datetime | None, upper: datetime | None) -> bool:
    """lower <= LastModified < upper; a row that does not say when it was written is kept (the done-set decides)."""
    if last_modified is None:
        return True
    when = last_modified if last_modified.tzinfo else last_modified.replace(tzinfo=UTC)
    return (lower is None or when >= lower) and (upper is None or when < upper)
