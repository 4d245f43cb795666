"""What every destination is: the protocol, the target it is given and the result it returns.

A destination turns a :class:`~processing.sources.ByteSource` into one delivered file at
``target.path`` (already rendered from the path template, see :mod:`.paths`). It must be safe
to call :meth:`Destination.deliver` again for the same ``target.key`` after a crash or a
redelivered event: whatever state lets the next attempt resume (a Graph upload session URL)
goes into the :class:`CheckpointStore` under that key, and is deleted after success.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

from processing.sources import ByteSource

from .manifest import Manifest

__all__ = [
    "CONFLICT_BEHAVIOURS",
    "CheckpointStore",
    "Conflict",
    "DeliveryResult",
    "DeliveryTarget",
    "Destination",
    "ProgressCallback",
]

#: What to do when the target name is taken: ``fail`` (DeliveryConflict), ``replace`` the
#: existing file, or ``rename`` the new one (``name (1).ext`` locally, ``name 1.ext`` on
#: OneDrive, which picks the name itself).
Conflict = Literal["fail", "replace", "rename"]
CONFLICT_BEHAVIOURS: tuple[str, ...] = get_args(Conflict)

#: Called with the number of bytes delivered so far (monotonic within one attempt).
ProgressCallback = Callable[[int], Awaitable[None]]

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, kw_only=True)
class DeliveryTarget:
    """Where and how one upload or transfer is delivered.

    ``key`` is the upload/transfer id: resumable state is recorded under it. ``path`` is the
    relative destination path, already rendered and sanitized. ``sha256`` (lowercase hex), when
    known from receiving, is checked against the bytes read before the file is committed.
    ``drive`` overrides a OneDrive destination's default drive selector (ignored locally);
    ``owner`` fills a ``{owner}`` placeholder in a selector such as ``users/{owner}`` (deliver
    into each owner's own OneDrive).
    """

    key: str
    path: str
    conflict: Conflict = "fail"
    content_type: str = "application/octet-stream"
    sha256: str | None = None
    drive: str | None = None
    owner: str | None = None

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("DeliveryTarget.key must not be empty")
        if self.conflict not in CONFLICT_BEHAVIOURS:
            raise ValueError(f"DeliveryTarget.conflict must be one of {CONFLICT_BEHAVIOURS}")
        if self.sha256 is not None:
            normalized = self.sha256.lower()
            if not _SHA256_HEX.fullmatch(normalized):
                raise ValueError("DeliveryTarget.sha256 must be 64 hex digits")
            object.__setattr__(self, "sha256", normalized)


@dataclass(frozen=True, kw_only=True)
class DeliveryResult:
    """The delivered file, as reported in the status JSON ``result`` (SPEC §3.3).

    ``destination`` names the place (``local:<path>`` or ``onedrive:<drive>/root:/<path>``),
    ``path`` is the final relative path (differs from the target's after a rename), ``sha256``
    is lowercase hex of the bytes delivered.
    """

    destination: str
    item_id: str
    web_url: str
    size: int
    sha256: str
    path: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "item_id": self.item_id,
            "web_url": self.web_url,
            "size": self.size,
            "sha256": self.sha256,
        }


class CheckpointStore(Protocol):
    """Resumable delivery state by key; values are small JSON objects.

    Implementations: :class:`~.checkpoints.MemoryCheckpointStore`,
    :class:`~.checkpoints.FileCheckpointStore` (a NATS KV one lives with the worker).
    """

    async def load(self, key: str) -> dict[str, Any] | None: ...

    async def save(self, key: str, state: dict[str, Any]) -> None: ...

    async def delete(self, key: str) -> None: ...


class Destination(Protocol):
    """A place files are delivered to."""

    #: Short kind name: ``local`` or ``onedrive``.
    kind: str

    async def deliver(
        self,
        source: ByteSource,
        target: DeliveryTarget,
        *,
        checkpoint: CheckpointStore,
        progress: ProgressCallback | None = None,
        cancel: asyncio.Event | None = None,
    ) -> DeliveryResult:
        """Deliver all of ``source`` to ``target``; resume recorded state under ``target.key``.

        Raises :class:`~.errors.DeliveryError` (and nothing else).
        """
        ...

    async def abort(self, key: str, checkpoint: CheckpointStore) -> None:
        """Drop the recorded state of ``key`` and clean up remotely (e.g. DELETE the session)."""
        ...

    async def write_manifest(self, result: DeliveryResult, manifest: Manifest) -> str:
        """Write ``manifest`` beside the delivered file; return the manifest's path."""
        ...

    async def aclose(self) -> None:
        """Release connections and credentials."""
        ...
