"""The JSON manifest written beside a delivered file (SPEC §3.4).

The manifest lives at ``<delivered path>.manifest.json`` (:func:`manifest_path`) and describes
the file: name, size, sha256, content type, owner, source, timestamps and the client's
metadata. Both destinations write it through ``Destination.write_manifest``; the bytes come
from :meth:`Manifest.to_json` so they are identical everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .base import DeliveryResult

__all__ = ["MANIFEST_SCHEMA", "MANIFEST_SUFFIX", "Manifest", "manifest_path"]

MANIFEST_SCHEMA = "tusgate.manifest.v1"
MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(path: str) -> str:
    """The manifest's relative path for a delivered file's relative path."""
    return path + MANIFEST_SUFFIX


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a manifest says about one delivered file."""

    name: str
    size: int
    sha256: str
    content_type: str
    delivered_at: datetime
    owner: str | None = None
    created_at: datetime | None = None
    #: Where the bytes came from, as in the transfer API: ``{"upload": id}``, ``{"s3": {...}}``.
    source: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, str | None] = field(default_factory=dict)
    destination: str = ""
    item_id: str = ""
    web_url: str = ""

    @classmethod
    def for_result(
        cls,
        result: DeliveryResult,
        *,
        content_type: str,
        owner: str | None = None,
        source: Mapping[str, Any] | None = None,
        metadata: Mapping[str, str | None] | None = None,
        created_at: datetime | None = None,
        delivered_at: datetime | None = None,
    ) -> Manifest:
        """A manifest for a finished delivery; ``delivered_at`` defaults to now."""
        name = result.path.rsplit("/", 1)[-1] if result.path else result.item_id
        return cls(
            name=name,
            size=result.size,
            sha256=result.sha256,
            content_type=content_type,
            delivered_at=delivered_at or datetime.now(UTC),
            owner=owner,
            created_at=created_at,
            source=dict(source or {}),
            metadata=dict(metadata or {}),
            destination=result.destination,
            item_id=result.item_id,
            web_url=result.web_url,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "content_type": self.content_type,
            "owner": self.owner,
            "source": dict(self.source),
            "created_at": _iso(self.created_at),
            "delivered_at": _iso(self.delivered_at),
            "destination": self.destination,
            "item_id": self.item_id,
            "web_url": self.web_url,
            "metadata": dict(self.metadata),
        }

    def to_json(self) -> bytes:
        return (
            json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        ).encode()
