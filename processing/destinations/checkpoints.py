"""Checkpoint stores: where a delivery records the state that lets another attempt resume.

Both implementations keep values JSON-round-tripped, so a state that would not survive the
NATS KV store (non-JSON values) fails here too, in tests.

On-disk layout of :class:`FileCheckpointStore`: one file per key,
``<directory>/<sha256(key)[:40]>.json``, replaced atomically (write a temp file, fsync,
``os.replace``), so a crash leaves either the old or the new state, never half of one. Hashing
the key means any key (even ``../x``) maps to a plain file name inside the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["FileCheckpointStore", "MemoryCheckpointStore"]


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    value = json.loads(json.dumps(state))
    if not isinstance(value, dict):  # pragma: no cover - json of a dict is a dict
        raise TypeError("checkpoint state must be a JSON object")
    return value


class MemoryCheckpointStore:
    """In-process checkpoints (tests, and a single embedded worker that may lose them)."""

    def __init__(self) -> None:
        self._states: dict[str, str] = {}

    async def load(self, key: str) -> dict[str, Any] | None:
        raw = self._states.get(key)
        return None if raw is None else _roundtrip(json.loads(raw))

    async def save(self, key: str, state: dict[str, Any]) -> None:
        self._states[key] = json.dumps(state)

    async def delete(self, key: str) -> None:
        self._states.pop(key, None)

    def keys(self) -> list[str]:
        """Keys with recorded state (for tests and diagnostics)."""
        return sorted(self._states)


class FileCheckpointStore:
    """Checkpoints as JSON files in one directory (survive a restart of the embedded worker)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def _file(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        return self.directory / f"{digest}.json"

    async def load(self, key: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._load, key)

    async def save(self, key: str, state: dict[str, Any]) -> None:
        data = json.dumps({"key": key, "state": state}).encode()
        await asyncio.to_thread(self._save, key, data)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._file(key).unlink, True)

    def _load(self, key: str) -> dict[str, Any] | None:
        try:
            raw = self._file(key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            # A torn file cannot happen with os.replace; a hand-edited one can. Starting over is
            # safe (worst case: one abandoned remote session that expires on its own).
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        state = record.get("state")
        return state if isinstance(state, dict) else None

    def _save(self, key: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".ckpt-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self._file(key))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
