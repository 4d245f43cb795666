"""Part arithmetic of the S3 store (gateway/store/s3parts.py), checked with Hypothesis.

The rules S3 imposes: at most 10,000 parts, every part at least 5 MiB except the last, none over
5 GiB. On top, the store's own: every byte placed exactly once and in order, whatever the PATCH
requests and body chunks looked like; a tail always shorter than a part; concatenation buffers no
more than 5 MiB per part.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.store.s3parts import (
    DEFAULT_PART_SIZE,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    BufferPart,
    CopyPart,
    Part,
    PartSplitter,
    calc_part_size,
    plan_concat,
    plan_write,
)

MiB = 1024 * 1024
GiB = 1024 * MiB
LARGEST = MAX_PARTS * MAX_PART_SIZE  # what 10,000 parts of 5 GiB hold


def test_part_size_for_onedrive_limit() -> None:
    # OneDrive takes 250 GiB per file: 10,000 parts of 25.6 MiB, rounded up to 26 MiB.
    assert calc_part_size(250 * GiB) == 26 * MiB
    assert calc_part_size(1 * GiB) == DEFAULT_PART_SIZE
    assert calc_part_size(0) == DEFAULT_PART_SIZE
    assert calc_part_size(10, preferred=1) == MIN_PART_SIZE
    with pytest.raises(ValueError):
        calc_part_size(LARGEST + 1)


@given(
    max_size=st.integers(0, LARGEST),
    preferred=st.integers(1, 64 * MiB),
    align=st.sampled_from([1, 4096, MiB]),
)
def test_part_size_reaches_max_size_within_limits(
    max_size: int, preferred: int, align: int
) -> None:
    try:
        size = calc_part_size(max_size, preferred=preferred, align=align)
    except ValueError:
        # only when no aligned part of at most 5 GiB can do it
        assert -(-max_size // MAX_PARTS) > MAX_PART_SIZE - MAX_PART_SIZE % align
        return
    assert MIN_PART_SIZE <= size <= MAX_PART_SIZE
    assert size >= preferred
    assert -(-max_size // size) <= MAX_PARTS  # 10,000 parts reach max_size
    if size > max(preferred, MIN_PART_SIZE):  # grown only as far as needed
        assert size % align == 0
        assert -(-max_size // (size - align)) > MAX_PARTS


def simulate(
    size: int | None, part_size: int, writes: list[list[int]]
) -> tuple[list[Part], int, bool]:
    """Run writes through the splitter as the store does; returns parts, tail, complete."""
    parts: list[Part] = []
    parts_end, tail, complete = 0, 0, False
    for chunks in writes:
        if complete:  # a complete upload takes no more bytes (the store answers at once)
            assert sum(chunks) == 0
            continue
        plan = plan_write(
            part_size=part_size,
            parts_end=parts_end,
            next_number=len(parts) + 1,
            tail=tail,
            size=size,
            chunks=chunks,
        )
        parts += plan.parts
        parts_end = parts[-1].end if parts else 0
        assert plan.tail[0] == parts_end  # the tail starts where the parts end
        tail = plan.tail[1] - plan.tail[0]
        assert 0 <= tail < part_size  # always shorter than a part: folded into the next one
        complete = plan.complete
    return parts, tail, complete


def check_parts(parts: list[Part], part_size: int, total: int) -> None:
    assert [p.number for p in parts] == list(range(1, len(parts) + 1))
    position = 0
    for part in parts:
        assert part.start == position and part.size > 0  # every byte once, in order
        position = part.end
    assert position == total
    assert all(p.size == part_size for p in parts[:-1])  # none short but the last
    assert len(parts) <= MAX_PARTS


@st.composite
def split(draw: st.DrawFn, total: int, max_pieces: int) -> list[int]:
    cuts = draw(st.lists(st.integers(0, total), max_size=max_pieces))
    bounds = [0, *sorted(cuts), total]
    return [b - a for a, b in itertools.pairwise(bounds)]


@st.composite
def writes_of(draw: st.DrawFn, total: int) -> list[list[int]]:
    """`total` bytes as PATCH requests, each a body arriving in chunks (empty ones included)."""
    return [draw(split(n, 6)) for n in draw(split(total, 8))]


@given(data=st.data(), part_size=st.integers(1, 50), total=st.integers(0, 600))
def test_every_byte_placed_once_whatever_the_requests(
    data: st.DataObject, part_size: int, total: int
) -> None:
    writes = data.draw(writes_of(total))
    parts, tail, complete = simulate(total, part_size, writes)
    assert complete and tail == 0
    check_parts(parts, part_size, total)
    assert len(parts) == -(-total // part_size)


@given(data=st.data(), part_size=st.integers(1, 50), total=st.integers(0, 600))
def test_deferred_length_keeps_a_tail_until_declared(
    data: st.DataObject, part_size: int, total: int
) -> None:
    parts, tail, complete = simulate(None, part_size, data.draw(writes_of(total)))
    assert not complete
    assert len(parts) * part_size + tail == total  # nothing lost, nothing counted twice
    check_parts(parts, part_size, len(parts) * part_size)


@given(
    size=st.integers(0, 250 * GiB),
    deferred=st.booleans(),
    data=st.data(),
)
@example(size=250 * GiB, deferred=False, data=None).via("the largest upload")
@example(size=250 * GiB, deferred=True, data=None).via("the largest upload, length deferred")
@settings(max_examples=40, deadline=None)
def test_at_most_10000_parts_up_to_max_size(
    size: int, deferred: bool, data: st.DataObject | None
) -> None:
    max_size = 250 * GiB
    part_size = calc_part_size(max_size if deferred else size)
    writes = (
        data.draw(writes_of(size)) if data is not None else [[size // 3, 0], [size - size // 3]]
    )
    parts, tail, complete = simulate(None if deferred else size, part_size, writes)
    assert complete != deferred
    if deferred:  # declaring the length makes the tail the last part
        parts += [Part(len(parts) + 1, size - tail, size)] if tail else []
    check_parts(parts, part_size, size)
    assert all(p.size >= MIN_PART_SIZE for p in parts[:-1])


def test_splitter_refuses_bytes_past_the_length() -> None:
    splitter = PartSplitter(part_size=10, parts_end=0, next_number=1, tail=0, size=5)
    with pytest.raises(ValueError):
        splitter.feed(6)


# -- concatenation ---------------------------------------------------------------------------


def check_concat(
    sizes: list[int], plan: list[CopyPart | BufferPart], min_part: int, max_part: int
) -> None:
    assert [p.number for p in plan] == list(range(1, len(plan) + 1))
    pieces: list[tuple[int, int, int]] = []
    for part in plan:
        if isinstance(part, CopyPart):
            pieces.append((part.source, part.start, part.end))
        else:
            assert part.size <= min_part  # the gateway's memory per buffered part
            pieces += part.pieces
        assert 0 < part.size <= max_part
    # Every byte of every partial once, in order (empty partials contribute nothing).
    expected = [(i, 0, n) for i, n in enumerate(sizes) if n]
    merged: list[tuple[int, int, int]] = []
    for source, start, end in pieces:
        assert start < end
        if merged and merged[-1][0] == source and merged[-1][2] == start:
            merged[-1] = (source, merged[-1][1], end)
        else:
            merged.append((source, start, end))
    assert merged == expected
    assert all(p.size >= min_part for p in plan[:-1])  # none short but the last


@given(sizes=st.lists(st.integers(0, 100), max_size=12), min_part=st.integers(1, 20))
def test_concat_plan_small_numbers(sizes: list[int], min_part: int) -> None:
    max_part = 2 * min_part + 3
    plan = plan_concat(sizes, min_part=min_part, max_part=max_part)
    check_concat(sizes, plan, min_part, max_part)


@given(
    sizes=st.lists(
        st.one_of(st.integers(0, 2 * MIN_PART_SIZE), st.integers(0, 12 * GiB)), max_size=10
    )
)
def test_concat_plan_real_limits(sizes: list[int]) -> None:
    plan = plan_concat(sizes)
    check_concat(sizes, plan, MIN_PART_SIZE, MAX_PART_SIZE)
    assert len(plan) <= MAX_PARTS


def test_concat_copies_big_partials_and_buffers_small_ones() -> None:
    plan = plan_concat([5 * MiB + 3, 17, 1000])
    assert plan == [CopyPart(1, 0, 0, 5 * MiB + 3), BufferPart(2, ((1, 0, 17), (2, 0, 1000)))]
    # A small partial in the middle borrows from the next one, whose rest is still copied.
    plan = plan_concat([5 * MiB, 10, 6 * MiB])
    assert plan == [
        CopyPart(1, 0, 0, 5 * MiB),
        BufferPart(2, ((1, 0, 10), (2, 0, 5 * MiB - 10))),
        CopyPart(3, 2, 5 * MiB - 10, 6 * MiB),
    ]


def test_concat_refuses_too_many_parts() -> None:
    with pytest.raises(ValueError):
        plan_concat([10] * 50, min_part=10, max_part=20, max_parts=49)
