"""Host-side file access to a session's work directory, safe against what the sandbox left there.

Between two execs no sandbox process runs, but the directory holds whatever the last command made:
symlinks to host paths, FIFOs, hard links. Every path is walked one component at a time from a
directory fd with O_NOFOLLOW, files are only read when they are regular, and writes replace the
entry (unlink + O_EXCL) instead of writing through it.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk_dirs(root: Path, parts: tuple[str, ...], create: bool, chown: Callable[[int], None]) -> int:
    fd = os.open(root, _DIR)
    try:
        for name in parts:
            try:
                nfd = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, 0o755, dir_fd=fd)
                nfd = os.open(name, _DIR, dir_fd=fd)
                chown(nfd)
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def put_file(root: Path, rel: PurePosixPath, content: bytes, mode: int, chown: Callable[[int], None]) -> None:
    fd = _walk_dirs(root, rel.parts[:-1], True, chown)
    try:
        name = rel.parts[-1]
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError as e:
            raise OSError(errno.EISDIR, f"{rel} is a directory") from e
        f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    (mode or 0o644) & 0o7777, dir_fd=fd)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(f, view):]
            chown(f)
        finally:
            os.close(f)
    finally:
        os.close(fd)


def get_file(root: Path, rel: PurePosixPath, max_bytes: int) -> tuple[bytes, int] | None:
    """(content, mode) of a regular file, None when missing or not a regular file."""
    try:
        fd = _walk_dirs(root, rel.parts[:-1], False, lambda _fd: None)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None
    try:
        f = os.open(rel.parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        st = os.fstat(f)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > max_bytes:
            raise ValueError(f"{rel} is {st.st_size} bytes, more than the {max_bytes} a get may return")
        chunks = []
        while data := os.read(f, 1 << 20):
            chunks.append(data)
        return b"".join(chunks), stat.S_IMODE(st.st_mode)
    finally:
        os.close(f)


def disk_usage(root: Path) -> int:
    """Bytes allocated under root, not following symlinks. A folder the sandbox closed to its owner
    (``chmod 000``; the sandbox's files are ours when the server is not root) is opened back up to
    us rather than skipped, so nothing hides from the quota."""
    total = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            entries = _entries(d)
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)
    return total


def _entries(d: str) -> list[os.DirEntry]:
    try:
        with os.scandir(d) as it:
            return list(it)
    except PermissionError:
        _reopen_to_owner(d)
        with os.scandir(d) as it:
            return list(it)


def _reopen_to_owner(d: str) -> None:
    """``chmod u+rwx`` a folder of ours, through an O_PATH descriptor (never a symlink swapped in)."""
    fd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid():
            os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(st.st_mode) | stat.S_IRWXU)
    finally:
        os.close(fd)


class QuotaWatch:
    """A host work directory's size during a run, against its quota. A walk costs time in proportion
    to the files there, so the next one waits ten times as long as the last took (at least one poll):
    the walks take at most a tenth of a core, and a writer passes the quota by at most what it
    writes in that interval."""

    def __init__(self, root: Path, quota_bytes: int) -> None:
        self.root, self.quota_bytes = root, quota_bytes
        self.used_bytes = 0
        self._next = 0.0

    def over(self) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self.used_bytes = disk_usage(self.root)
            self._next = now + 10 * (time.monotonic() - now)
        return self.used_bytes > self.quota_bytes
