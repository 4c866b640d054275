"""The rootless image: a read-only view of this node's own system, for bubblewrap.

An ordinary user cannot build an image (debootstrap needs root) and on a cluster nobody but the
admin is root. Every node already has a system with ``python3``: bubblewrap can show a sandbox its
``/usr`` (and the ``/bin``, ``/lib*`` links or folders beside it) read-only, with the few ``/etc``
files that programs need to start, on an empty root that is itself remounted read-only. Nothing
else of the host is there: no home, no ``/root``, no ``/var``, no ``/opt``, no ``/etc/passwd`` or
``/etc/shadow``, no project checkout, no run directory. The namespaces, the seccomp filter, the
limits and the private ``/tmp``, ``/dev/shm`` and ``/work`` are the same as with a built image.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

HOST = "host"  # the image name that asks for this view

# Beside /usr: merged-/usr systems have these as links into /usr, older ones as folders.
_TOP = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What the dynamic loader, Debian's Python and `update-alternatives` links need; nothing secret.
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime",
        "/etc/python3", "/etc/os-release")


@dataclass(frozen=True)
class HostView:
    """The node's own ``/usr`` and friends, read-only (bwrap only). ``str()`` is its image name."""

    def __str__(self) -> str:
        return HOST

    def describe(self) -> str:
        return "a read-only view of this node's /usr (rootless, no built image)"

    def has(self, program: str) -> bool:
        """Whether ``program`` is in the view's /usr/bin or /bin."""
        return shutil.which(program, path="/usr/local/bin:/usr/bin:/bin") is not None

    def bwrap_root(self) -> list[str]:
        """bwrap arguments that make the root: binds and links (an empty, later read-only, tmpfs root)."""
        args = ["--ro-bind", "/usr", "/usr"]
        for path in _TOP:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in _ETC + _versioned_python_etc():
            if os.path.lexists(path):
                args += ["--ro-bind", path, path]
        return args

    @staticmethod
    def bwrap_seal() -> list[str]:
        """After every other mount: the root itself read-only (its own mounts keep their modes)."""
        return ["--remount-ro", "/"]


def _versioned_python_etc() -> tuple[str, ...]:
    """``/etc/python3.11`` and the like (Debian's sitecustomize.py links there)."""
    try:
        names = os.listdir("/etc")
    except OSError:
        return ()
    return tuple(f"/etc/{n}" for n in sorted(names) if n.startswith("python3."))
