"""Fixtures shared by every test folder: an ordinary (unprivileged) user to run matrix-hpc as.

Cluster users are not root. Tests that check a code path as an ordinary user run it through
``as_user`` (``runuser``), in folders that belong to that user (``user_dir``). When the suite
runs as root, the user is created once (``useradd``); otherwise the current user already is one.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

TEST_USER = "mhpc-tester"
REPO = Path(__file__).resolve().parent


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def command(self, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
        """``argv`` run as this user with a clean environment plus ``env`` (as-is when we are this user)."""
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), "USER": self.name,
                "LANG": "C.UTF-8", "RAY_USAGE_STATS_ENABLED": "0",
                "MATRIX_HPC_CACHE": os.environ.get("MATRIX_HPC_CACHE", str(REPO / ".cache"))}
        if os.environ.get("PYTHONPATH"):  # a checkout other than the venv's editable one
            base["PYTHONPATH"] = os.environ["PYTHONPATH"]
        pairs = [f"{k}={v}" for k, v in {**base, **(env or {})}.items()]
        if os.geteuid() == self.uid:
            return ["env", *pairs, *argv]
        return ["runuser", "-u", self.name, "--", "env", "-i", *pairs, *argv]

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
            cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv, env), cwd=cwd, timeout=timeout, check=check,
                              capture_output=True, text=True)


def _ensure_user() -> User:
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.geteuid())
        return User(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", TEST_USER], check=True)
        pw = pwd.getpwnam(TEST_USER)
    _let_others_reach(Path(sys.executable).resolve())
    _let_others_reach(REPO / "conftest.py")  # a checkout under a private folder (CI's clone)
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir))


def _let_others_reach(interpreter: Path) -> None:
    """The venv's base interpreter (pyenv in /root), or the checkout, may live under a root-only
    folder: grant others traverse (not read) on the folders above, so the user can run our code."""
    for d in reversed(interpreter.parents):
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(d, mode | stat.S_IXOTH)


@pytest.fixture(scope="session")
def unprivileged_user() -> User:
    """An ordinary user (no root, no capabilities) that can read this checkout and its venv."""
    return _ensure_user()


@pytest.fixture
def user_dir(unprivileged_user: User):
    """A fresh folder owned by the unprivileged user (pytest's tmp_path is root-only)."""
    d = Path(tempfile.mkdtemp(prefix="mhpc-user-", dir=os.environ.get("MATRIX_HPC_TEST_TMP", "/tmp")))
    os.chown(d, unprivileged_user.uid, unprivileged_user.gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- litter: what the suite leaves in /tmp and /dev/shm ------------------------------------------------
# `make test` sets MATRIX_HPC_CHECK_LITTER=1: the suite then fails if it left anything new at the top of
# /tmp or /dev/shm (owned by the suite's users, made after it started), listing it. Not on by default:
# on a machine shared with other work, others' files would be blamed on a targeted run.
LITTER_DIRS = ("/tmp", "/dev/shm")
NOT_LITTER = ("pytest-of-",)  # pytest's own base folder (it keeps its last three runs by design)


def _suite_uids() -> set[int]:
    uids = {os.geteuid()}
    try:
        uids.add(pwd.getpwnam(TEST_USER).pw_uid)
    except KeyError:
        pass
    return uids


def _entries() -> dict[str, tuple[int, float]]:
    found = {}
    for d in LITTER_DIRS:
        try:
            with os.scandir(d) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    found[e.path] = (st.st_uid, st.st_ctime)
        except OSError:
            continue
    return found


def litter_since(before: dict[str, tuple[int, float]], started: float) -> list[str]:
    """Entries of /tmp and /dev/shm that were not there at ``started``, belong to the suite's users and
    were made after it; the local Slurm's state folder and pytest's base folder are not litter."""
    uids, slurm_dir = _suite_uids(), os.environ.get("SLURM_DIR", "")
    return sorted(
        path for path, (uid, ctime) in _entries().items()
        if path not in before and uid in uids and ctime >= started
        and not os.path.basename(path).startswith(NOT_LITTER) and path != slurm_dir
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    # A suite started in the background by a non-interactive shell (`make test &`) ignores SIGINT,
    # and so would every process it starts: the tests that press Ctrl-C on a run need the default.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("MATRIX_HPC_CHECK_LITTER") == "1":
        session.config.stash[_LITTER_KEY] = (_entries(), time.time() - 1)
        session.config.stash[_LITTER_SEEN_KEY] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Notes, for each new entry, the test after which it was first seen, so the report names it."""
    result = yield
    if _LITTER_KEY in item.config.stash:
        seen = item.config.stash[_LITTER_SEEN_KEY]
        for path in litter_since(*item.config.stash[_LITTER_KEY]):
            seen.setdefault(path, item.nodeid)
    return result


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown (the shared Ray's included)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_LITTER_KEY, None)
    if state is None:
        return
    left = litter_since(*state)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        write = reporter.write_line if reporter else print
        write("")
        write(f"the suite left {len(left)} thing(s) in {' and '.join(LITTER_DIRS)}:")
        seen = session.config.stash.get(_LITTER_SEEN_KEY, {})
        for path in left:
            write(f"  {path}  (first seen after {seen.get(path, 'the last test')})")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_LITTER_KEY = pytest.StashKey[tuple]()
_LITTER_SEEN_KEY = pytest.StashKey[dict]()
