"""The seccomp filter every bubblewrap sandbox runs under (``bwrap --seccomp FD``).

Everything is allowed except what a code sandbox never needs: debugging other processes, mounts,
kernel keyrings, eBPF, perf, loading kernels or modules, new namespaces (a nested user namespace
would hand the code a fresh set of capabilities), and a few host-wide knobs. Blocked calls fail
with EPERM; ``clone3`` answers ENOSYS so that libc falls back to ``clone``, whose flags a filter can
see. Only the native architecture's calls are allowed (libseccomp kills a foreign-ABI call).

Programs that want shared memory use files in ``/dev/shm`` or ``/tmp`` (what ``shm_open``,
``multiprocessing`` and a denied ``memfd_create``'s usual fallbacks do) or ``MAP_SHARED|MAP_ANONYMOUS``
mappings: both are counted against the memory cap.

One more rule makes the file-size limit visible in the wait status: a program may not install a
handler for (or ignore) SIGXFSZ, so writing past ``RLIMIT_FSIZE`` kills it with that signal. Python
ignores SIGXFSZ at start-up and would otherwise only see ``EFBIG``.
"""

from __future__ import annotations

import errno
import functools
import os
import signal

BLOCKED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "setns", "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "open_by_handle_at",
    "name_to_handle_at", "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "vhangup", "uselib", "personality", "lookup_dcookie", "fanotify_init",
    # Shared memory that outlives every mapping of it, out of the watchdog's sight: a memfd can be
    # parked in a Unix socket's queue with no fd or mapping left, a SysV segment in the sandbox's IPC
    # namespace. (Shared anonymous mappings and files in the sandbox's tmpfs folders stay allowed
    # and are counted.)
    "memfd_create", "memfd_secret", "shmget",
)
# Any namespace flag in clone/unshare (CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID |
# NEWNET | NEWTIME).
NEW_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 \
    | 0x40000000 | 0x00000080


class SeccompUnavailable(RuntimeError):
    """The filter cannot be built here (libseccomp or its Python binding missing)."""


@functools.cache
def filter_program() -> bytes:
    """The compiled classic-BPF program (built once per process)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as e:  # OSError: libseccomp.so.2 not found
        raise SeccompUnavailable(f"the sandbox's seccomp filter needs libseccomp2 and pyseccomp: {e}") from e
    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(errno.EPERM)
    for name in BLOCKED:
        try:
            f.add_rule(eperm, name)
        except (ValueError, OSError):  # not a call on this architecture
            pass
    for name in ("unshare", "clone"):
        for flag in _bits(NEW_NAMESPACE_FLAGS):
            f.add_rule(eperm, name, sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(eperm, "rt_sigaction", sc.Arg(0, sc.EQ, signal.SIGXFSZ), sc.Arg(1, sc.NE, 0))
    fd = os.memfd_create("sandbox-seccomp-build", 0)
    with os.fdopen(fd, "w+b") as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def filter_fd() -> int:
    """A fresh file descriptor holding the program, for one ``bwrap --seccomp FD`` (it reads it whole)."""
    fd = os.memfd_create("sandbox-seccomp", 0)
    os.write(fd, filter_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _bits(mask: int) -> list[int]:
    return [1 << i for i in range(mask.bit_length()) if mask >> i & 1]
