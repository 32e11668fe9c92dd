"""producer.chunking and producer.filters: lazy chunks, suffixes, folder markers, our own output skipped."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from producer.chunking import chunked
from producer.filters import DEFAULT_SUFFIXES, image_objects, parse_suffixes
from worker.seams.storage import ObjectInfo


def test_chunk_sizes_are_full_then_the_remainder_in_order() -> None:
    assert list(chunked(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(chunked(range(6), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(chunked(range(2), 50)) == [[0, 1]]
    assert list(chunked(range(3), 1)) == [[0], [1], [2]]


def test_empty_input_gives_no_chunks() -> None:
    assert list(chunked([], 5)) == []


@pytest.mark.parametrize("size", [0, -1])
def test_chunk_size_below_one_is_refused(size: int) -> None:
    with pytest.raises(ValueError):
        list(chunked(range(3), size))


def test_chunking_is_lazy_on_an_infinite_generator() -> None:
    assert list(itertools.islice(chunked(itertools.count(), 4), 3)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_chunking_pulls_only_one_chunk_ahead() -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for n in itertools.count():
            pulled.append(n)
            yield n

    chunks = chunked(source(), 5)
    assert pulled == []
    assert next(chunks) == [0, 1, 2, 3, 4]
    assert len(pulled) == 5
    next(chunks)
    assert len(pulled) == 10


def test_parse_suffixes_normalises_dots_case_and_spaces() -> None:
    assert parse_suffixes(".png,jpg") == (".png", ".jpg")
    assert parse_suffixes(" PNG , .Jpeg ,") == (".png", ".jpeg")


@pytest.mark.parametrize("text", [None, "", " , ,"])
def test_parse_suffixes_empty_means_image_defaults(text: str | None) -> None:
    assert parse_suffixes(text) == DEFAULT_SUFFIXES


def objs(*keys: str) -> list[ObjectInfo]:
    return [ObjectInfo(k, 1, "e") for k in keys]


def keys(objects: Iterator[ObjectInfo]) -> list[str]:
    return [o.key for o in objects]


def test_only_keys_with_an_image_suffix_are_kept_case_insensitively() -> None:
    listed = objs("a.png", "b.JPG", "c.jpeg", "d.txt", "e.png.json", "f.webp", "png", "g.bmp")
    assert keys(image_objects(listed, DEFAULT_SUFFIXES)) == ["a.png", "b.JPG", "c.jpeg", "f.webp", "g.bmp"]
    assert keys(image_objects(listed, (".png",))) == ["a.png"]


def test_folder_markers_are_dropped() -> None:
    listed = objs("cam/", "cam/a.png", "cam/sub.png/", "cam/sub.png/b.png")
    assert keys(image_objects(listed, DEFAULT_SUFFIXES)) == ["cam/a.png", "cam/sub.png/b.png"]


def test_excluded_output_prefix_is_dropped() -> None:
    listed = objs("cam/a.png", "results/runs/r1/chunks/000001.json", "results/runs/r1/debug.png", "results/b.png")
    assert keys(image_objects(listed, DEFAULT_SUFFIXES, "results/runs")) == ["cam/a.png", "results/b.png"]
    assert keys(image_objects(listed, DEFAULT_SUFFIXES, "results/runs/")) == ["cam/a.png", "results/b.png"]


def test_excluded_prefix_is_a_folder_not_a_name_prefix() -> None:
    # With an empty output prefix the excluded folder is "runs": a capture named runs-*.png is still judged.
    listed = objs("runs/r1/x.png", "runs-2024/a.png", "runsheet.png")
    assert keys(image_objects(listed, DEFAULT_SUFFIXES, "runs")) == ["runs-2024/a.png", "runsheet.png"]


def test_filtering_is_lazy() -> None:
    endless = (ObjectInfo(f"k{n}.png", 1, "e") for n in itertools.count())
    assert len(list(itertools.islice(image_objects(endless, DEFAULT_SUFFIXES), 3))) == 3
