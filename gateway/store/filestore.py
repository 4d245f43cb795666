"""The filesystem store: one directory, three kinds of file per upload.

Layout under the store directory (permissions needed: read/write/create/rename/delete there):

    <id>.bin       the bytes received so far; its size IS the offset (nothing else records it,
                   so after a crash the offset is exactly what reached the disk)
    <id>.info      UploadInfo as JSON, replaced atomically (write <id>.info.tmp, rename)
    <id>.pending   present only while a checksummed chunk is being written: holds the offset
                   the chunk started at. Until the checksum is verified the chunk does not count;
                   a crash leaves the marker and opening the store truncates back to it.

Ids are validated (lowercase hex) before any path is built, so no id can name a file outside
the directory. Writes land in the page cache when `write_chunk` returns, which survives a
`kill -9` of the gateway; `fsync=True` also makes every chunk survive a power loss.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path

from gateway.store.base import (
    ChunkCheck,
    InfoChange,
    OffsetConflict,
    UploadGone,
    UploadInfo,
    UploadNotFound,
)

__all__ = ["FileStore"]

ID_PATTERN = re.compile(r"^[0-9a-f]{32}\Z")
READ_CHUNK = 256 * 1024


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """DataStore + Terminater + Concater + LengthDeferrer + ContentReader + Lister."""

    def __init__(self, directory: Path, *, fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.directory.mkdir(parents=True, exist_ok=True)
        self._root = self.directory.resolve()  # once: processing gets absolute paths
        # Offsets of checksummed chunks in flight in this process (their markers' content),
        # so that HEAD needs no extra file probe.
        self._pending: dict[str, int] = {}

    # -- paths ------------------------------------------------------------------------------

    def _path(self, upload_id: str, suffix: str) -> Path:
        if not ID_PATTERN.match(upload_id):
            raise UploadNotFound(upload_id)
        return self.directory / f"{upload_id}{suffix}"

    def recover(self) -> None:
        """After a crash, before serving: undo checksummed chunks left unverified (see the module
        docstring) and remove half-created files. Only the gateway that owns the directory calls
        this, at start-up: other readers (a worker) must not, as writes may be in flight."""
        for marker in self.directory.glob("*.pending"):
            data = marker.with_suffix(".bin")
            try:
                offset = int(marker.read_text())
                if data.exists() and data.stat().st_size > offset:
                    os.truncate(data, offset)
            except (OSError, ValueError):
                pass  # markers are written atomically; an unreadable one protects nothing
            marker.unlink(missing_ok=True)
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        for info in self.directory.glob("*.info"):
            try:
                json.loads(info.read_text())
            except ValueError:  # a creation cut short: its POST never answered
                info.unlink(missing_ok=True)
        for data in self.directory.glob("*.bin"):
            # A crash between creating the bytes file and its info leaves a file that no client
            # ever got a Location for: nobody can reach it, so it goes.
            if not data.with_suffix(".info").exists():
                data.unlink(missing_ok=True)

    def _write_marker(self, marker: Path, offset: int) -> None:
        """Atomically, like the info: a half-written marker must never truncate the upload."""
        tmp = marker.with_name(marker.name + ".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, marker)

    async def ping(self) -> None:
        """Raise unless the directory is there and writable (for /readyz)."""
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise OSError(f"{self.directory} is not writable")

    # -- info -------------------------------------------------------------------------------

    def _write_info(self, info: UploadInfo, *, new: bool = False) -> None:
        """Replace the info atomically (temp file + rename). A new upload's info is written in
        place with O_EXCL instead: until the POST answers nobody knows the id, and `recover`
        removes an info that a crash left half-written."""
        path = self._path(info.id, ".info")
        data = dict(info.to_json())
        data.pop("offset", None)  # the offset is the size of <id>.bin, never stored twice
        target = path if new else path.with_name(path.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if new else os.O_TRUNC)
        with open(os.open(target, flags, 0o600), "w") as fh:
            json.dump(data, fh)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if not new:
            os.replace(target, path)  # atomic: readers see the old info or the new, never half

    def _read_info(self, upload_id: str) -> UploadInfo:
        try:
            raw = self._path(upload_id, ".info").read_text()
        except FileNotFoundError:
            raise UploadNotFound(upload_id) from None
        info = UploadInfo.from_json(json.loads(raw))
        if info.gone:
            raise UploadGone(upload_id, info.gone, owner=info.owner)
        try:
            st = self._path(upload_id, ".bin").stat()
        except FileNotFoundError:
            raise UploadNotFound(upload_id) from None
        # An unverified checksummed chunk in flight does not count yet.
        offset = self._pending.get(upload_id, st.st_size)
        return info.replace(offset=offset, updated_at=max(info.updated_at, st.st_mtime))

    async def create(self, info: UploadInfo) -> UploadInfo:
        data = self._path(info.id, ".bin")
        info = info.replace(offset=0, storage={"kind": "file", "path": str(self._root / data.name)})
        # Bytes file first: an info file always has its bytes file, so it is never unreadable.
        fd = os.open(data, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        self._write_info(info, new=True)
        return info

    async def get_info(self, upload_id: str) -> UploadInfo:
        return self._read_info(upload_id)

    async def update_info(self, upload_id: str, change: InfoChange) -> UploadInfo:
        # Read, change and write with no await in between: atomic within this process, the
        # only one that writes this directory's infos.
        current = self._read_info(upload_id)
        info = change(current).replace(id=upload_id, offset=current.offset)
        self._write_info(info)
        return info

    # -- bytes ------------------------------------------------------------------------------

    async def write_chunk(
        self,
        upload_id: str,
        offset: int,
        chunks: AsyncIterable[bytes],
        *,
        check: ChunkCheck | None = None,
    ) -> int:
        data = self._path(upload_id, ".bin")
        marker = self._path(upload_id, ".pending")
        try:
            fd = os.open(data, os.O_WRONLY)
        except FileNotFoundError:
            raise UploadNotFound(upload_id) from None
        written = 0
        completed = False
        try:
            if os.fstat(fd).st_size != offset:
                # The caller checked the offset under the upload's lock; a mismatch here means
                # the info on disk moved underneath, and appending would corrupt the upload.
                raise OffsetConflict(f"store offset is not {offset}")
            if check is not None:
                self._write_marker(marker, offset)
                self._pending[upload_id] = offset
            os.lseek(fd, offset, os.SEEK_SET)
            # Plain blocking writes: they land in the page cache in microseconds; moving each
            # one to a thread costs more than it saves. The await on `chunks` is the
            # back-pressure: nothing more is read from the socket until this write is done.
            async for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    written += n
            completed = True
        finally:
            if check is not None and not (completed and check()):
                os.ftruncate(fd, offset)  # all-or-nothing: the chunk did not verify
                written = 0
            if self.fsync and written:
                await asyncio.to_thread(os.fsync, fd)
            os.close(fd)
            if check is not None:
                marker.unlink(missing_ok=True)
                self._pending.pop(upload_id, None)
        return written

    async def declare_length(self, upload_id: str, length: int) -> UploadInfo:
        info = self._read_info(upload_id)
        info = info.replace(size=length)
        self._write_info(info)
        return info

    def read(self, upload_id: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._path(upload_id, ".bin")
        return self._read(path, start, end)

    async def _read(self, path: Path, start: int, end: int | None) -> AsyncIterator[bytes]:
        try:
            fh = open(path, "rb")  # noqa: ASYNC230, SIM115 -- page-cache reads; closed below
        except FileNotFoundError:
            raise UploadNotFound(path.stem) from None
        with fh:
            fh.seek(start)
            remaining = (end - start) if end is not None else None
            while remaining is None or remaining > 0:
                size = READ_CHUNK if remaining is None else min(READ_CHUNK, remaining)
                chunk = fh.read(size)
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
                await asyncio.sleep(0)  # page-cache reads never block: let others run between

    # -- capabilities -----------------------------------------------------------------------

    async def terminate(self, upload_id: str) -> None:
        info_path = self._path(upload_id, ".info")
        if not info_path.exists():
            raise UploadNotFound(upload_id)
        for suffix in (".bin", ".pending", ".info"):
            self._path(upload_id, suffix).unlink(missing_ok=True)

    async def discard_bytes(
        self,
        upload_id: str,
        reason: str,
        *,
        only_if: Callable[[UploadInfo], bool] | None = None,
    ) -> bool:
        try:
            raw = self._path(upload_id, ".info").read_text()
        except FileNotFoundError:
            raise UploadNotFound(upload_id) from None
        info = UploadInfo.from_json(json.loads(raw))
        if info.gone or (only_if is not None and not only_if(self._read_info(upload_id))):
            return False
        self._write_info(info.replace(gone=reason, updated_at=time.time()))
        self._path(upload_id, ".bin").unlink(missing_ok=True)
        return True

    async def concat(self, final: UploadInfo, partials: list[UploadInfo]) -> None:
        """Build the final upload with copy_file_range: the kernel copies, Python never sees it."""
        target = self._path(final.id, ".bin")
        sources = [self._path(p.id, ".bin") for p in partials]
        await asyncio.to_thread(_concat_files, target, sources)
        if self.fsync:
            await asyncio.to_thread(_fsync_path, target)

    async def list_uploads(self) -> AsyncIterator[UploadInfo]:
        for path in sorted(self.directory.glob("*.info")):
            upload_id = path.name[: -len(".info")]
            try:
                yield self._read_info(upload_id)
            except UploadGone:
                raw = json.loads(path.read_text())
                yield UploadInfo.from_json(raw)
            except (UploadNotFound, ValueError, OSError):
                continue


def _concat_files(target: Path, sources: list[Path]) -> None:
    with open(target, "r+b") as out:
        out.truncate(0)
        for src in sources:
            with open(src, "rb") as inp:
                size = os.fstat(inp.fileno()).st_size
                try:
                    copied = 0
                    while copied < size:
                        n = os.copy_file_range(inp.fileno(), out.fileno(), size - copied)
                        if n == 0:
                            break
                        copied += n
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    inp.seek(copied)
                    out.seek(0, os.SEEK_END)
                    shutil.copyfileobj(inp, out, READ_CHUNK)
