"""Crash-safe file primitives and the zarr store the run store writes through.

Every file the run store writes goes to a temporary name in the same directory, is fsynced,
then renamed over its final name: a reader (or a process started after a crash) sees either
the old file or the whole new one, never a prefix. Directories are fsynced after renames so
the new names survive a node crash too.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from zarr.abc.buffer import Buffer
from zarr.storage import LocalStore

TMP_SUFFIX = ".partial"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | memoryview, *, fsync: bool = True) -> int:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            n = f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="store-fsync")
    return _POOL


def _forget_pool() -> None:  # a forked child has none of the parent's threads
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


class DurableLocalStore(LocalStore):
    """A zarr ``LocalStore`` whose writes are fsynced before the atomic rename.

    zarr's own LocalStore already writes through a temporary file and a rename; this adds the
    fsync (so "flush returned" means "on disk", not "in the page cache") and records the
    directories touched so the caller can fsync them once per commit.
    """

    def __init__(self, root: Path | str, *, read_only: bool = False, fsync: bool = True) -> None:
        super().__init__(root, read_only=read_only)
        self._fsync = fsync
        self.dirty_dirs: set[Path] = set()

    def with_read_only(self, read_only: bool = False) -> DurableLocalStore:
        return type(self)(self.root, read_only=read_only, fsync=self._fsync)

    # zarr's public Store API: set and set_if_not_exists (its _set_many calls set)
    async def set(self, key: str, value: Buffer) -> None:
        await self._write(key, value, exclusive=False)

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        try:
            await self._write(key, value, exclusive=True)
        except FileExistsError:
            pass

    async def _write(self, key: str, value: Buffer, *, exclusive: bool) -> None:
        if self.read_only:
            raise ValueError("store was opened in read-only mode and does not support writing")
        if not isinstance(value, Buffer):
            raise TypeError(f"DurableLocalStore.set(): value must be a Buffer, got {type(value)}")
        path = self.root / key
        if exclusive and path.exists():
            raise FileExistsError(path)
        await asyncio.to_thread(write_atomic, path, value.as_buffer_like(), fsync=self._fsync)
        self.dirty_dirs.add(path.parent)

    def sync_dirs(self) -> None:
        """fsync every directory that received a new name since the last call."""
        dirs, self.dirty_dirs = self.dirty_dirs, set()
        if not self._fsync or not dirs:
            return
        if len(dirs) == 1:
            fsync_dir(dirs.pop())
            return
        # issued together, the filesystem can satisfy them with one journal commit
        list(_pool().map(fsync_dir, dirs))
