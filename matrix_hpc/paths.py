"""Where matrix-hpc keeps things: what is built once and shared (models, images: ``cache_dir``) and
what one user writes for themselves (``state_dir``).

The cache is written by whoever builds it (root, or one user) and only read by every other user:
what goes into it is made readable by all (``share_tree``), whatever the builder's umask.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class StateDirError(RuntimeError):
    """The per-user state folder is not this user's alone."""


def cache_dir() -> Path:
    """``$MATRIX_HPC_CACHE``, else ``.cache`` in a source checkout, else ``~/.cache/matrix-hpc``."""
    env = os.environ.get("MATRIX_HPC_CACHE")
    if env:
        return Path(env)
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / ".cache"
    return Path.home() / ".cache" / "matrix-hpc"


def state_dir() -> Path:
    """This user's own folder: ``$MATRIX_HPC_STATE``, else ``$XDG_STATE_HOME/matrix-hpc``, else
    ``~/.local/state/matrix-hpc``. Made owner-only (0700); one that belongs to another user or that
    others can read or write is refused (StateDirError)."""
    env = os.environ.get("MATRIX_HPC_STATE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "matrix-hpc"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as e:
        raise StateDirError(f"the matrix-hpc state folder {path} cannot be made or read ({e.strerror}): set "
                            "MATRIX_HPC_STATE to a folder of your own") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"{path} (the matrix-hpc state folder, $MATRIX_HPC_STATE) is not a folder")
    if st.st_uid != os.geteuid():
        raise StateDirError(f"{path} (the matrix-hpc state folder) belongs to uid {st.st_uid}, not to you "
                            f"(uid {os.geteuid()}): set MATRIX_HPC_STATE to a folder of your own")
    if st.st_mode & 0o077:
        raise StateDirError(f"{path} (the matrix-hpc state folder) has mode {stat.S_IMODE(st.st_mode):04o}: "
                            f"other users can reach it; fix it with: chmod 700 {path}")
    return path


def make_shared_dir(path: Path) -> Path:
    """``mkdir -p path`` where every folder it makes is 0755 (readable by all), whatever the umask."""
    missing = [p for p in [path, *path.parents] if not p.exists()]
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue  # made by another process meanwhile: its mode is its maker's
        os.chmod(d, 0o755)
    return path


def share_tree(root: Path) -> None:
    """Let every user read ``root`` and everything under it (folders r-x, files r, and x where the
    owner has x), whatever the umask it was written with; nobody else gets write. Symbolic links
    are left alone (their targets are inside the tree or outside it, never followed)."""
    _share(root)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            _share(Path(parent) / name)


def _share(path: Path) -> None:
    st = path.lstat()
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        wanted = (mode | 0o555) & ~0o022
    else:
        wanted = (mode | 0o444 | (0o111 if mode & 0o100 else 0)) & ~0o022
    if wanted != mode:
        os.chmod(path, wanted)


class CacheUnreadable(RuntimeError):
    """The cache (or something in it) is out of this user's reach; the message names the fix."""


def check_cache_readable() -> Path:
    """``cache_dir()``, refused (CacheUnreadable) where it exists but this user cannot read it."""
    path = cache_dir()
    try:
        path.stat()
    except FileNotFoundError:
        return path  # nothing built: what is needed says so itself
    except PermissionError:
        pass
    if not os.access(path, os.R_OK | os.X_OK):
        raise CacheUnreadable(f"the matrix-hpc cache {path} is not readable by you ({describe_owner(path)}): "
                              f"ask its owner to run `chmod a+rX {path}`, or set MATRIX_HPC_CACHE to a cache of "
                              "your own")
    return path


def first_unreadable(root: Path) -> Path | None:
    """The first folder under ``root`` (itself included) this user cannot list or enter, or file they
    cannot read; None when every one is readable."""
    if not os.access(root, os.R_OK | (os.X_OK if root.is_dir() else 0)):
        return root
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            if not os.access(Path(parent) / name, os.R_OK | os.X_OK):
                return Path(parent) / name
        for name in files:
            if not os.access(Path(parent) / name, os.R_OK):
                return Path(parent) / name
    return None


def describe_owner(path: Path) -> str:
    """``mode 0600, owner root`` (or why it cannot be told)."""
    try:
        st = path.stat()
    except OSError as e:
        return e.strerror or str(e)
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner {owner}"
