"""Checksum: verify the staged bytes against the digest the client declared in its metadata.

The client puts ``checksum`` in ``Upload-Metadata`` as ``<algorithm> <digest>``, the digest in
hex or base64 (as TUS's ``Upload-Checksum`` writes it), e.g. ``sha256 47DEQpj8HBSa+/...=``.
Algorithms: ``sha256``, ``sha1``, ``md5``, ``sha512`` (also spelled ``sha-256`` ...).

The step streams the whole source through the hash (one pass, bounded memory), reporting
progress, so it verifies the bytes as they are *now* in the store -- not only as the gateway
saw them arrive. Without a ``checksum`` value the step passes at once.

* no such algorithm, or a digest that is neither hex nor base64 of the right length →
  ``checksum_invalid``
* a different digest → ``checksum_mismatch``
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from processing.errors import CheckFailed
from processing.sources import open_range
from processing.steps.base import StepContext

__all__ = ["ALGORITHMS", "METADATA_KEY", "VerifyChecksum", "parse_declared"]

METADATA_KEY = "checksum"
ALGORITHMS = {"sha256": 32, "sha1": 20, "md5": 16, "sha512": 64}  # name → digest bytes
#: Hash this many bytes per thread hop: the loop stays free, the hop cost stays small.
_BATCH = 4 * 1024 * 1024


def parse_declared(value: str) -> tuple[str, bytes]:
    """``"sha256 <hex|base64>"`` → ``("sha256", digest bytes)``; CheckFailed(checksum_invalid)."""
    parts = value.strip().split()
    if len(parts) != 2:
        raise CheckFailed("checksum_invalid", "checksum metadata must be '<algorithm> <digest>'")
    algorithm = parts[0].lower().replace("-", "")
    size = ALGORITHMS.get(algorithm)
    if size is None:
        raise CheckFailed(
            "checksum_invalid",
            f"checksum algorithm {parts[0]!r} is not one of {', '.join(sorted(ALGORITHMS))}",
        )
    text = parts[1]
    digest: bytes | None = None
    if re.fullmatch(r"[0-9a-fA-F]+", text) and len(text) == 2 * size:
        digest = bytes.fromhex(text)
    else:
        try:
            decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            try:
                decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            except (binascii.Error, ValueError):
                decoded = b""
        digest = decoded if len(decoded) == size else None
    if digest is None:
        raise CheckFailed(
            "checksum_invalid", f"{algorithm} digest must be {size} bytes in hex or base64"
        )
    return algorithm, digest


@dataclass(frozen=True)
class VerifyChecksum:
    name: str = "checksum"

    async def run(self, ctx: StepContext) -> str:
        value = ctx.job.metadata.get(METADATA_KEY)
        if not value:
            return "no checksum declared"
        algorithm, expected = parse_declared(value)
        hasher = hashlib.new(algorithm)
        done = 0
        batch: list[bytes] = []
        pending = 0
        async with open_range(ctx.source, 0, ctx.source.size) as chunks:
            async for chunk in chunks:
                batch.append(chunk)
                pending += len(chunk)
                if pending >= _BATCH:
                    await asyncio.to_thread(_update, hasher, batch)
                    done += pending
                    batch, pending = [], 0
                    await ctx.progress(done)
        if batch:
            await asyncio.to_thread(_update, hasher, batch)
            done += pending
            await ctx.progress(done)
        actual = hasher.digest()
        if actual != expected:
            raise CheckFailed(
                "checksum_mismatch",
                f"{algorithm} of the upload is {actual.hex()}, the client declared "
                f"{expected.hex()}",
            )
        ctx.facts[f"verified_{algorithm}"] = actual.hex()
        return f"{algorithm} matches"


def _update(hasher: Any, chunks: list[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)
