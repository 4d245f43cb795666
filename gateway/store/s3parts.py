"""Part arithmetic of the S3 store: pure functions, no I/O (tested with Hypothesis).

S3 multipart uploads have three rules (AWS "Amazon S3 multipart upload limits"):

* at most 10,000 parts per upload;
* every part is at least 5 MiB, "except the last part";
* no part is larger than 5 GiB.

The store keeps all of them by construction:

* `calc_part_size` picks one part size per upload, large enough that 10,000 parts hold the
  largest size the upload may reach (its `Upload-Length`, or `Tus-Max-Size` while the length
  is deferred). Every part but the last is *exactly* that size, so an upload of n bytes has
  ``ceil(n / part_size) <= 10,000`` parts whatever its PATCH requests looked like.
* `PartSplitter` decides, while a request body streams in, where its bytes go: full parts are
  uploaded as they fill up; what is left at the end of a request is the *tail* (kept in its
  own object and folded into the next part by the next request), or the last part when the
  upload is complete.
* `plan_concat` turns a list of partial uploads into the parts of the final upload: server-side
  copies (UploadPartCopy) of every partial that is big enough, and small buffered parts where a
  partial is under the 5 MiB minimum and is not the end of the final upload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PART_SIZE",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "BufferPart",
    "CopyPart",
    "Part",
    "PartSplitter",
    "WritePlan",
    "calc_part_size",
    "plan_concat",
    "plan_write",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MIN_PART_SIZE = 5 * MiB  # "5 MiB to 5 GiB. There is no minimum size limit on the last part"
MAX_PART_SIZE = 5 * GiB
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 8 * MiB  # what @tus/s3-store and most SDKs use: few requests, little memory


def calc_part_size(
    max_size: int,
    *,
    min_part: int = MIN_PART_SIZE,
    max_parts: int = MAX_PARTS,
    preferred: int = DEFAULT_PART_SIZE,
    max_part: int = MAX_PART_SIZE,
    align: int = MiB,
) -> int:
    """The part size for an upload that may grow to `max_size` bytes.

    `preferred` (but never under `min_part`) unless `max_parts` parts of it cannot hold
    `max_size`; then the smallest size that can, rounded up to a multiple of `align` (250 GiB
    needs 26 MiB parts). Raises ValueError when even `max_part` parts are too small.
    """
    if max_size < 0 or min_part <= 0 or max_parts <= 0 or align <= 0:
        raise ValueError("sizes must be positive")
    size = max(preferred, min_part)
    needed = -(-max_size // max_parts)
    if needed > size:
        size = -(-needed // align) * align
    if size > max_part:
        raise ValueError(f"{max_size} bytes need parts over {max_part} bytes")
    return size


@dataclass(frozen=True)
class Part:
    """Bytes [start, end) of the upload, uploaded as part `number` (1-based)."""

    number: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class PartSplitter:
    """Where the bytes of one write go, decided as they arrive.

    The upload's parts cover [0, `parts_end`); the tail covers [parts_end, parts_end + tail).
    Bytes are appended after the tail. Whenever part_size bytes are pending (tail included),
    `feed` returns that full part: the caller uploads it and the tail is folded into it. At the
    end of the write, `finish` says what is left: the last part (if the upload is now complete)
    or the new tail.
    """

    def __init__(
        self, *, part_size: int, parts_end: int, next_number: int, tail: int, size: int | None
    ) -> None:
        if part_size <= 0 or not 0 <= tail < part_size:
            raise ValueError("the tail is always shorter than a part")
        self.part_size = part_size
        self.start = parts_end  # where the pending bytes (tail + new) begin
        self.pending = tail
        self.next_number = next_number
        self.size = size

    @property
    def end(self) -> int:
        return self.start + self.pending

    def room(self) -> int:
        """Bytes that still fit into the current part."""
        return self.part_size - self.pending

    def feed(self, n: int) -> list[Part]:
        """`n` more bytes arrived; returns the parts they filled, in order."""
        if n < 0:
            raise ValueError("negative length")
        if self.size is not None and self.end + n > self.size:
            raise ValueError("write goes past the upload's length")
        full: list[Part] = []
        while n:
            take = min(n, self.room())
            self.pending += take
            n -= take
            if self.pending == self.part_size:
                full.append(self._cut())
        return full

    def finish(self) -> WritePlan:
        """What the pending bytes become now that the write is over."""
        complete = self.size is not None and self.end == self.size
        if complete and self.pending:
            return WritePlan(parts=(self._cut(),), tail=(self.start, self.start), complete=True)
        return WritePlan(parts=(), tail=(self.start, self.end), complete=complete)

    def _cut(self) -> Part:
        part = Part(self.next_number, self.start, self.start + self.pending)
        self.next_number += 1
        self.start, self.pending = part.end, 0
        return part


@dataclass(frozen=True)
class WritePlan:
    parts: tuple[Part, ...]  # parts to upload, in order
    tail: tuple[int, int]  # [start, end) kept as the tail object (empty: no tail)
    complete: bool  # the upload has all its bytes: complete the multipart upload


def plan_write(
    *,
    part_size: int,
    parts_end: int,
    next_number: int,
    tail: int,
    size: int | None,
    chunks: Iterable[int],
) -> WritePlan:
    """The whole plan of one write whose body arrives in chunks of the given lengths."""
    splitter = PartSplitter(
        part_size=part_size, parts_end=parts_end, next_number=next_number, tail=tail, size=size
    )
    parts: list[Part] = []
    for n in chunks:
        parts += splitter.feed(n)
    last = splitter.finish()
    return WritePlan(parts=(*parts, *last.parts), tail=last.tail, complete=last.complete)


# -- concatenation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyPart:
    """Part `number` is bytes [start, end) of partial `source`, copied inside S3."""

    number: int
    source: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BufferPart:
    """Part `number` is these (source, start, end) pieces, read through the gateway."""

    number: int
    pieces: tuple[tuple[int, int, int], ...]

    @property
    def size(self) -> int:
        return sum(end - start for _, start, end in self.pieces)


def plan_concat(
    sizes: list[int],
    *,
    min_part: int = MIN_PART_SIZE,
    max_part: int = MAX_PART_SIZE,
    max_parts: int = MAX_PARTS,
) -> list[CopyPart | BufferPart]:
    """The parts of a final upload made of partials of these sizes, in order.

    A partial (or what is left of it) of at least `min_part` bytes -- or one that reaches the
    end of the final upload -- is copied server-side, split evenly into pieces of at most
    `max_part`. Smaller runs are gathered into a buffered part of exactly `min_part` bytes
    (fewer at the very end), taking what is needed from the following partials: that bounds
    the gateway's memory for a concatenation by `min_part`. Raises ValueError past `max_parts`.
    """
    if max_part < 2 * min_part:
        raise ValueError("copies are split evenly: max_part must be at least 2 x min_part")
    total = sum(sizes)
    parts: list[CopyPart | BufferPart] = []
    pending: list[tuple[int, int, int]] = []
    pending_len = 0
    done = 0  # bytes of the final upload planned so far (pending included)

    def flush() -> None:
        nonlocal pending, pending_len
        parts.append(BufferPart(len(parts) + 1, tuple(pending)))
        pending, pending_len = [], 0

    for source, size in enumerate(sizes):
        if size < 0:
            raise ValueError("negative size")
        offset = 0
        while offset < size:
            rest = size - offset
            reaches_end = done + rest == total
            if not pending and (rest >= min_part or reaches_end):
                pieces = -(-rest // max_part)
                for i in range(pieces):
                    # Even pieces: each is over max_part / 2 when there are several, so never
                    # under the minimum (max_part is far above 2 x min_part).
                    start = offset + rest * i // pieces
                    end = offset + rest * (i + 1) // pieces
                    parts.append(CopyPart(len(parts) + 1, source, start, end))
                offset = size
                done += rest
                continue
            take = min(rest, min_part - pending_len)
            pending.append((source, offset, offset + take))
            pending_len += take
            offset += take
            done += take
            if pending_len == min_part or done == total:
                flush()
    if pending:
        flush()
    if len(parts) > max_parts:
        raise ValueError(f"{len(parts)} parts needed, at most {max_parts} allowed")
    return parts
