"""What a store is: one small required protocol plus one protocol per optional capability.

The TUS handlers know nothing about disks or buckets. They talk to a `StoreComposer`, which
holds the required `DataStore` and whichever capabilities the configured store offers; the
advertised `Tus-Extension` list is derived from it (as tusd's ``composer.go`` does), never
kept by hand.

    DataStore            create / get_info / write_chunk / update_info (core, creation, checksum)
    + Terminater         terminate                                    (termination)
    + Concater           concat                                       (concatenation[-unfinished])
    + LengthDeferrer     declare_length                               (creation-defer-length)
    + ContentReader      read                                         (GET /files/{id}, processing)
    + Lister             list_uploads                                 (expiration sweeper)
"""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ANONYMOUS",
    "ChunkCheck",
    "ConcatError",
    "Concater",
    "ContentReader",
    "DataStore",
    "InfoChange",
    "LengthDeferrer",
    "Lister",
    "OffsetConflict",
    "StoreComposer",
    "StoreError",
    "StoreUnavailable",
    "Terminater",
    "UploadGone",
    "UploadIncomplete",
    "UploadInfo",
    "UploadNotFound",
    "decode_metadata",
]

ANONYMOUS = "anonymous"

# Called once the whole request body has been handed to the store; False means "the chunk failed
# its checksum: discard it". The store must then leave the upload exactly as it was.
ChunkCheck = Callable[[], bool]

# A change to an upload's info, applied to its current info by `update_info`: a function, not a
# value, so that a store shared by several instances can apply it again to a newer info when
# someone else changed the upload in between (compare-and-set), instead of overwriting them.
InfoChange = Callable[["UploadInfo"], "UploadInfo"]


class StoreError(Exception):
    """Root of every store error; anything a store raises that is not one of these is a bug."""


class UploadIncomplete(StoreError):
    """These bytes cannot be read until the upload is complete (S3 cannot read the parts of an
    unfinished multipart upload)."""


class StoreUnavailable(StoreError):
    """The storage service failed or cannot be reached (S3 down, denied, throttled): retry later."""


class UploadNotFound(StoreError):
    """No upload with this id exists (never did, or was terminated)."""


class UploadGone(StoreError):
    """The upload existed but its bytes are gone (expired, or delivered and cleaned up)."""

    def __init__(self, upload_id: str, reason: str, *, owner: str | None = None) -> None:
        super().__init__(f"upload {upload_id} is gone ({reason})")
        self.reason = reason
        self.owner = owner  # whose it was (when known): a stranger must not learn it existed


class OffsetConflict(StoreError):
    """The stored offset is not where the caller meant to write (someone else wrote)."""


class ConcatError(StoreError):
    """A final upload cannot be assembled from the partial uploads given."""


def decode_metadata(raw: str | None) -> dict[str, str | None]:
    """Decode an already validated `Upload-Metadata` header; undecodable values become None."""
    result: dict[str, str | None] = {}
    if not raw:
        return result
    for pair in raw.split(","):
        parts = pair.strip().split(" ")
        key = parts[0]
        if len(parts) == 1 or parts[1] == "":
            result[key] = None
            continue
        try:
            result[key] = base64.b64decode(parts[1], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            result[key] = None
    return result


@dataclass(frozen=True, kw_only=True)
class UploadInfo:
    """Everything known about one upload. Immutable: change it with `dataclasses.replace`."""

    id: str
    size: int | None  # None while the length is deferred (creation-defer-length)
    offset: int = 0
    metadata_raw: str | None = None  # `Upload-Metadata` exactly as received, echoed on HEAD
    owner: str = ANONYMOUS
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)  # last byte written (drives expiry)
    is_partial: bool = False
    partial_uploads: tuple[str, ...] = ()  # set on a final upload: its parts, in order
    # A final upload made of unfinished partials (concatenation-unfinished) has no size and no
    # bytes until every partial is complete; `assembled` says whether its bytes are in place.
    assembled: bool = True
    part_of: tuple[str, ...] = ()  # on a partial: finals waiting for it to complete
    storage: dict[str, str] = field(default_factory=dict)  # where the bytes live (store-specific)
    gone: str | None = None  # "expired" / "delivered": a tombstone that answers 410

    @property
    def is_final(self) -> bool:
        return bool(self.partial_uploads)

    @property
    def size_is_deferred(self) -> bool:
        return self.size is None

    @property
    def is_complete(self) -> bool:
        return self.size is not None and self.offset == self.size and self.assembled

    def expires_at(self, expiration: float) -> float | None:
        """When an unfinished upload expires: `expiration` seconds after its last byte (0 =
        never). Complete and final uploads never expire."""
        if not expiration or self.is_complete or self.is_final:
            return None
        return self.updated_at + expiration

    @property
    def metadata(self) -> dict[str, str | None]:
        return decode_metadata(self.metadata_raw)

    def replace(self, **changes: Any) -> UploadInfo:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["partial_uploads"] = list(self.partial_uploads)
        data["part_of"] = list(self.part_of)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UploadInfo:
        known = {f.name for f in dataclasses.fields(cls)}
        # Readers ignore unknown fields so that a newer gateway's info stays readable.
        values = {k: v for k, v in data.items() if k in known}
        values["partial_uploads"] = tuple(values.get("partial_uploads", ()))
        values["part_of"] = tuple(values.get("part_of", ()))
        return cls(**values)


@runtime_checkable
class DataStore(Protocol):
    """The core every store implements."""

    async def create(self, info: UploadInfo) -> UploadInfo:
        """Reserve storage for a new upload and persist its info."""

    async def get_info(self, upload_id: str) -> UploadInfo:
        """Current info; `offset` is what is durably stored. Raises UploadNotFound/UploadGone."""

    async def write_chunk(
        self,
        upload_id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        *,
        check: ChunkCheck | None = None,
    ) -> int:
        """Append the bytes of `chunks` at `offset` and return how many were kept.

        Whatever arrived is kept when `chunks` raises (client gone, lock taken over) -- unless
        `check` is given: a checksummed chunk is all-or-nothing, kept only when the body was read
        to its end and `check()` returns True. The store is durable when this returns.
        """

    async def update_info(self, upload_id: str, change: InfoChange) -> UploadInfo:
        """Apply `change` to the current info atomically and return the result. Only the fields
        the handlers own change (size of a final upload, `assembled`, `part_of`); the offset is
        the store's and stays what the store holds. Raises UploadNotFound/UploadGone."""


@runtime_checkable
class Terminater(Protocol):
    async def terminate(self, upload_id: str) -> None:
        """Delete the upload's bytes and info; afterwards get_info raises UploadNotFound."""


@runtime_checkable
class Concater(Protocol):
    async def concat(self, final: UploadInfo, partials: list[UploadInfo]) -> None:
        """Fill `final` (already created, size = sum of parts) from the complete partials."""


@runtime_checkable
class LengthDeferrer(Protocol):
    async def declare_length(self, upload_id: str, length: int) -> UploadInfo:
        """Fix the length of an upload created with `Upload-Defer-Length: 1`."""


@runtime_checkable
class ContentReader(Protocol):
    def read(self, upload_id: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes [start, end) of the upload in bounded chunks."""


@runtime_checkable
class Lister(Protocol):
    def list_uploads(self) -> AsyncIterator[UploadInfo]:
        """Every upload's info, tombstones included (for the expiration sweeper)."""

    async def discard_bytes(
        self,
        upload_id: str,
        reason: str,
        *,
        only_if: Callable[[UploadInfo], bool] | None = None,
    ) -> bool:
        """Delete the bytes but keep a tombstone, so the id answers 410 with `reason`. With
        `only_if`, only when it holds for the current info (checked atomically with the
        tombstone, e.g. "still expired"). Returns whether the bytes were discarded."""


class StoreComposer:
    """The configured store and the capabilities it has; the handlers' only view of storage."""

    def __init__(self, core: DataStore) -> None:
        self.core = core
        self.terminater = core if isinstance(core, Terminater) else None
        self.concater = core if isinstance(core, Concater) else None
        self.length_deferrer = core if isinstance(core, LengthDeferrer) else None
        self.reader = core if isinstance(core, ContentReader) else None
        self.lister = core if isinstance(core, Lister) else None

    def extensions(self, *, expiration: bool) -> list[str]:
        """The `Tus-Extension` list, derived from what the store can do."""
        exts = ["creation", "creation-with-upload", "checksum"]
        if self.length_deferrer is not None:
            exts.append("creation-defer-length")
        if expiration and self.lister is not None:
            exts.append("expiration")
        if self.terminater is not None:
            exts.append("termination")
        if self.concater is not None:
            exts += ["concatenation", "concatenation-unfinished"]
        return exts
