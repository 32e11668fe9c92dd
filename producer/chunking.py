"""Splitting a stream into fixed-size chunks without holding the stream in memory (pure)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of at most `size` items, in order; only one list is held at a time."""
    if size < 1:
        raise ValueError("chunk size must be at least 1")
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch
