"""Files and folders only their owner may use: secrets, credentials, generated code.

Below ``job/``, ``runtime/`` and ``services/`` alike (each needs them; none should import another
for them). Every check refuses what another user could read or replace, and never follows a link.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path


class CredentialError(Exception):
    """A secret file that is missing, empty, or readable or writable by other users."""


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def _check_owner_only(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid != os.geteuid():
        raise CredentialError(f"{path}: {what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise CredentialError(
            f"{path}: {what} is accessible to other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it must be owner-only (chmod {'700' if stat.S_ISDIR(st.st_mode) else '600'})"
        )


def private_folder(path: str | Path) -> Path:
    """Create ``path`` (mode 0700) or check that it is ours and owner-only; never follow a link."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    return check_private_folder(path)


def check_private_folder(path: str | Path) -> Path:
    """``path`` if it is a folder (not a link) of ours that no one else can enter; else CredentialError."""
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CredentialError(f"{path}: no such folder") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CredentialError(f"{path}: expected a folder, found {'a link' if stat.S_ISLNK(st.st_mode) else 'a file'}")
    _check_owner_only(path, st, "folder")
    return path


def read_secret_file(path: str | Path) -> str:
    """The secret in ``path``; refuses a file another user could read or replace."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise CredentialError(f"{path}: no such secret file") from None
    except OSError as e:
        raise CredentialError(f"{path}: cannot open the secret file: {e.strerror}") from None
    with os.fdopen(fd) as f:
        _check_owner_only(path, os.fstat(fd), "secret file")
        secret = f.read().strip()
    if not secret:
        raise CredentialError(f"{path}: the secret file is empty")
    return secret


def secret_file(path: str | Path) -> str:
    """Read the secret in ``path``, creating it (mode 0600, a fresh random secret) if it does not exist
    (its folder too, 0700, if missing). Created whole or not at all: the secret is written to a
    temporary file that link() puts in place, so the nodes of a job that start together never read
    a half-written file, and the first to link wins (link is atomic on NFS too)."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        return read_secret_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        secret = new_secret()
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        os.link(tmp, path)
    except FileExistsError:
        return read_secret_file(path)
    finally:
        os.unlink(tmp)
    return secret
