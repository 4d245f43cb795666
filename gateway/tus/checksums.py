"""Hash objects for the checksum extension, all with the hashlib interface (crc32 included)."""

from __future__ import annotations

import hashlib
import zlib
from typing import Protocol

__all__ = ["Hasher", "new_hasher"]


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...


class _Crc32:
    """CRC-32 (IEEE, as zlib and tus-js-client compute it), digest big-endian 4 bytes."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")

    def hexdigest(self) -> str:
        return self.digest().hex()


def new_hasher(algorithm: str) -> Hasher:
    if algorithm == "crc32":
        return _Crc32()
    return hashlib.new(algorithm)
