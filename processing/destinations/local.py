"""Local-folder destination: the embedded default (SPEC §6, "same guarantees (atomic rename)").

Layout under ``root``: the delivered file at ``root/<target.path>`` and, optionally, its
manifest at ``root/<target.path>.manifest.json``. While a delivery runs, the bytes go to a
temp file in the same directory, ``.<name>.<random>.tusgate-part``; it is fsynced and then
moved into place in one step, so a reader never sees a partial file. A crash (``kill -9``)
can leave such a temp file behind; it is never visible under the final name, and the next
delivery to the same name removes it once it has not been written to for ``STALE_TEMP_AGE``
seconds (a live delivery writes to its temp file all the time).

Conflicts: ``replace`` is ``os.replace`` (atomic); ``fail`` and ``rename`` use ``os.link``,
which refuses to overwrite, so two workers can never clobber each other's file. ``rename``
tries ``name (1).ext``, ``name (2).ext``, ...

Nothing is written outside ``root``: the path must pass :func:`.paths.split_target_path`, and
the resolved parent directory (symlinks followed) must still be inside the resolved root.

Needs: read/write access to ``root`` (created if missing) and, for ``fail``/``rename``, a
filesystem with hard links (otherwise a non-atomic exists-check is used).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from processing.sources import ByteSource, FileSource, SourceError, open_range

from .base import CheckpointStore, DeliveryResult, DeliveryTarget, ProgressCallback
from .errors import (
    ChecksumMismatch,
    DeliveryCanceled,
    DeliveryConflict,
    DeliveryError,
    DestinationUnavailable,
    InvalidTarget,
    SourceFailed,
)
from .manifest import Manifest, manifest_path
from .paths import MAX_COMPONENT_BYTES, split_target_path

__all__ = ["MAX_RENAME_ATTEMPTS", "STALE_TEMP_AGE", "LocalFolderDestination"]

#: ``rename`` gives up (DeliveryConflict) after ``name (1)`` ... ``name (999)``.
MAX_RENAME_ATTEMPTS = 1000
_TEMP_SUFFIX = ".tusgate-part"
#: A temp file untouched for this long belongs to a delivery that died (worker killed).
STALE_TEMP_AGE = 3600.0
_HASH_CHUNK = 1024 * 1024


def _renamed(name: str, number: int) -> str:
    """``report.pdf`` → ``report (3).pdf``, kept within the component length limit."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    suffix = f" ({number})" + (f".{ext}" if ext else "")
    budget = MAX_COMPONENT_BYTES - len(suffix.encode())
    return stem.encode()[:budget].decode(errors="ignore") + suffix


def _sha256_of(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


def _copy_range(src: int, dst: int, position: int, count: int) -> None:
    """Copy bytes [position, position + count) of `src` to the same offsets of `dst`."""
    end = position + count
    while position < end:
        try:
            copied = os.copy_file_range(src, dst, end - position, position, position)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, min(end - position, _HASH_CHUNK), position)  # no kernel copy
            copied = os.pwrite(dst, data, position) if data else 0
        if copied == 0:
            raise SourceFailed(f"source file ended at byte {position}, expected {end}")
        position += copied


def _hash_range(src: int, digest: Any, buffer: bytearray, position: int, count: int) -> None:
    view = memoryview(buffer)
    while count:
        got = os.preadv(src, [view[:count]], position)
        if got == 0:
            raise SourceFailed(f"source file ended at byte {position}")
        digest.update(view[:got])
        position += got
        count -= got


def _remove_stale_temps(directory: Path, prefix: str) -> None:
    """Remove temp files of earlier deliveries to this name that died (see STALE_TEMP_AGE)."""
    old = time.time() - STALE_TEMP_AGE
    for path in directory.glob(f"{glob.escape(prefix)}*{_TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
            if path.stat().st_mtime < old:
                path.unlink()


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is; not every platform allows it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _io_error(action: str, exc: OSError) -> DeliveryError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DestinationUnavailable(f"cannot {action}: disk full", code="storage_full")
    return DestinationUnavailable(f"cannot {action}: {exc.strerror or exc}")


class LocalFolderDestination:
    """Deliver into a local directory tree (see the module docstring for the guarantees)."""

    kind = "local"

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync

    async def aclose(self) -> None:
        """Nothing to release; present for the Destination protocol."""

    async def abort(self, key: str, checkpoint: CheckpointStore) -> None:
        # Temp files are removed by the delivery that made them; only recorded state remains.
        await checkpoint.delete(key)

    async def deliver(
        self,
        source: ByteSource,
        target: DeliveryTarget,
        *,
        checkpoint: CheckpointStore,
        progress: ProgressCallback | None = None,
        cancel: asyncio.Event | None = None,
    ) -> DeliveryResult:
        components = split_target_path(target.path)
        directory = await asyncio.to_thread(self._prepare_directory, components[:-1])
        name = components[-1]
        prefix = f".{name[:64]}."
        await asyncio.to_thread(_remove_stale_temps, directory, prefix)
        try:
            fd, tmp_name = await asyncio.to_thread(
                tempfile.mkstemp, dir=directory, prefix=prefix, suffix=_TEMP_SUFFIX
            )
        except OSError as exc:
            raise _io_error("create a temp file", exc) from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                sha256 = await self._write(source, handle, progress, cancel)
                await asyncio.to_thread(self._flush, handle)
            if target.sha256 is not None and sha256 != target.sha256:
                raise ChecksumMismatch(
                    f"sha256 of the source is {sha256}, expected {target.sha256}"
                )
            final = await asyncio.to_thread(
                self._commit, tmp, directory, name, target, source.size, sha256
            )
        except OSError as exc:
            raise _io_error("write the destination file", exc) from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        await checkpoint.delete(target.key)
        relative = "/".join([*components[:-1], final.name])
        return DeliveryResult(
            destination=f"local:{relative}",
            item_id=relative,
            web_url=final.as_uri(),
            size=source.size,
            sha256=sha256,
            path=relative,
        )

    async def write_manifest(self, result: DeliveryResult, manifest: Manifest) -> str:
        relative = manifest_path(result.path)
        components = split_target_path(relative)
        directory = await asyncio.to_thread(self._prepare_directory, components[:-1])
        try:
            await asyncio.to_thread(
                self._write_small_file, directory, components[-1], manifest.to_json()
            )
        except OSError as exc:
            raise _io_error("write the manifest", exc) from exc
        return relative

    # -- steps (run in worker threads) ------------------------------------------------------

    def _prepare_directory(self, components: list[str]) -> Path:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            root = self.root.resolve(strict=True)
            directory = root.joinpath(*components).resolve()
            # A symlink inside the tree must not lead the delivery out of it.
            if directory != root and root not in directory.parents:
                raise InvalidTarget("destination path leaves the destination folder")
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _io_error("create the destination folder", exc) from exc
        return directory

    async def _write(
        self,
        source: ByteSource,
        handle: BinaryIO,
        progress: ProgressCallback | None,
        cancel: asyncio.Event | None,
    ) -> str:
        if isinstance(source, FileSource):
            return await self._copy_file(source, handle, progress, cancel)
        digest = hashlib.sha256()
        written = 0
        try:
            async with open_range(source, 0, source.size) as chunks:
                async for chunk in chunks:
                    if cancel is not None and cancel.is_set():
                        raise DeliveryCanceled("delivery canceled")
                    # Write and hash on two threads at once (both release the GIL): the
                    # delivery then takes about as long as the slower of the two, not the sum.
                    await asyncio.gather(
                        asyncio.to_thread(handle.write, chunk),
                        asyncio.to_thread(digest.update, chunk),
                    )
                    written += len(chunk)
                    if progress is not None:
                        await progress(written)
        except SourceError as exc:
            raise SourceFailed(exc.message, retryable=exc.retryable, code=exc.code) from exc
        if cancel is not None and cancel.is_set():
            raise DeliveryCanceled("delivery canceled")
        if written != source.size:
            raise SourceFailed(f"source yielded {written} of {source.size} bytes")
        return digest.hexdigest()

    async def _copy_file(
        self,
        source: FileSource,
        handle: BinaryIO,
        progress: ProgressCallback | None,
        cancel: asyncio.Event | None,
    ) -> str:
        """A local file (the filesystem store): the kernel copies it, as ``cp`` does
        (``copy_file_range``: no copy through Python), while a second thread hashes the same
        range through one reused buffer; one step per ``source.chunk_size`` bytes. Returns the
        sha256 of the source bytes."""
        digest = hashlib.sha256()
        step = source.chunk_size
        buffer = bytearray(min(step, source.size))
        try:
            src = await asyncio.to_thread(open, source.path, "rb")
        except OSError as exc:
            raise SourceFailed(
                f"cannot open the source file: {exc.strerror}",
                retryable=not isinstance(exc, FileNotFoundError),
            ) from exc
        try:
            position = 0
            while position < source.size:
                if cancel is not None and cancel.is_set():
                    raise DeliveryCanceled("delivery canceled")
                count = min(step, source.size - position)
                await asyncio.gather(
                    asyncio.to_thread(_copy_range, src.fileno(), handle.fileno(), position, count),
                    asyncio.to_thread(_hash_range, src.fileno(), digest, buffer, position, count),
                )
                position += count
                if progress is not None:
                    await progress(position)
        finally:
            src.close()
        return digest.hexdigest()

    @staticmethod
    def _write_chunk(handle: BinaryIO, digest: Any, chunk: bytes) -> None:
        handle.write(chunk)
        digest.update(chunk)

    def _flush(self, handle: BinaryIO) -> None:
        handle.flush()
        if self.fsync:
            os.fsync(handle.fileno())

    def _commit(
        self, tmp: Path, directory: Path, name: str, target: DeliveryTarget, size: int, sha256: str
    ) -> Path:
        final = directory / name
        if target.conflict == "replace":
            os.replace(tmp, final)
        elif target.conflict == "fail":
            if not self._link(tmp, final):
                if final.is_file() and _sha256_of(final) == (size, sha256):
                    # Same bytes already there: a redelivered event after a crash, not a conflict.
                    return final
                raise DeliveryConflict(f"{name!r} already exists")
        else:
            for number in range(MAX_RENAME_ATTEMPTS):
                final = directory / (name if number == 0 else _renamed(name, number))
                if self._link(tmp, final):
                    break
            else:
                raise DeliveryConflict(
                    f"no free name for {name!r} after {MAX_RENAME_ATTEMPTS} tries"
                )
        if self.fsync:
            _fsync_dir(directory)
        return final

    @staticmethod
    def _link(tmp: Path, final: Path) -> bool:
        """Create ``final`` from ``tmp`` unless it exists; False when the name is taken."""
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (
                errno.EPERM,
                errno.ENOTSUP,
                errno.EOPNOTSUPP,
                errno.EXDEV,
                errno.EMLINK,
            ):
                raise
        # No hard links here (some network/FUSE filesystems): check, then rename. Not atomic
        # against a concurrent creator of the same name, which only a second worker could be.
        if final.exists() or final.is_symlink():
            return False
        os.replace(tmp, final)
        return True

    def _write_small_file(self, directory: Path, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name[:64]}.", suffix=_TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                self._flush(handle)
            os.replace(tmp, directory / name)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
