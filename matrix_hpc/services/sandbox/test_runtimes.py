"""Unit tests of command construction (Apptainer cannot run here: only its argv is checked)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import pytest
from pydantic import ValidationError

from .runtimes import (
    ApptainerRuntime,
    BwrapRuntime,
    SandboxArgumentError,
    check_path,
    make_runtime,
)
from .spec import Limits, SandboxSpec

L = Limits()


def _pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_apptainer_exec_is_contained_and_offline():
    rt = ApptainerRuntime(image=Path("/img/python.sif"))
    argv = rt.command(["python3", "-c", "print(1)"], env={"A": "1"}, limits=L,
                      host_workdir=Path("/state/abc")).argv
    assert argv[:3] == ["apptainer", "--silent", "exec"]
    for flag in ("--containall", "--cleanenv", "--no-home", "--writable-tmpfs", "--no-privs"):
        assert flag in argv
    i = argv.index("--net")
    assert argv[i + 1: i + 3] == ["--network", "none"]
    assert _pairs(argv, "--bind") == ["/state/abc:/work"]
    assert _pairs(argv, "--pwd") == ["/work"]
    envs = _pairs(argv, "--env")
    assert "A=1" in envs and "HOME=/work" in envs and any(e.startswith("PATH=") for e in envs)
    # The image, then the command, last.
    assert argv[-4:] == ["/img/python.sif", "python3", "-c", "print(1)"]


def test_apptainer_network_allowed_and_sandbox_dir():
    rt = make_runtime("apptainer", Path("/cache/images/python"), network=True, binary="/opt/bin/apptainer")
    argv = rt.command(["true"], env={}, limits=L, host_workdir=Path("/w")).argv
    assert argv[0] == "/opt/bin/apptainer"
    assert "--net" not in argv and "--network" not in argv
    assert argv[-2:] == ["/cache/images/python", "true"]


def test_apptainer_needs_host_workdir_and_command():
    rt = ApptainerRuntime(image=Path("/i"))
    assert rt.needs_host_workdir
    with pytest.raises(ValueError):
        rt.command(["true"], env={}, limits=L)
    with pytest.raises(SandboxArgumentError):
        rt.command([], env={}, limits=L, host_workdir=Path("/w"))


def test_apptainer_instance_commands():
    rt = ApptainerRuntime(image=Path("/i.sif"))
    start = rt.instance_start("sess1", Path("/w"))
    assert start[:4] == ["apptainer", "--silent", "instance", "start"]
    assert "--containall" in start and "--network" in start and start[-2:] == ["/i.sif", "sess1"]
    assert rt.instance_stop("sess1")[-2:] == ["--force", "sess1"]


def test_bwrap_unshares_everything_and_fills_tmpfs_from_fds():
    rt = BwrapRuntime(image=Path("/img"))
    launch = rt.command(["python3", "main.py"], env={"X": "y"}, limits=L,
                        files=[(PurePosixPath("pkg/main.py"), b"print(1)", 0o755)])
    try:
        a = launch.argv
        for flag in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--clearenv"):
            assert flag in a
        assert "--share-net" not in a
        assert a[a.index("--ro-bind") + 1: a.index("--ro-bind") + 3] == ["/img", "/"]
        # /work is a fresh tmpfs of work_dir_bytes, with the file copied from an inherited fd.
        i = next(i for i, x in enumerate(a) if x == "/work" and a[i - 1] == "--tmpfs")
        assert a[i - 3: i] == ["--size", str(L.work_dir_bytes), "--tmpfs"]
        fd = int(_pairs(a, "--file")[0])
        assert fd in launch.pass_fds and os.pread(fd, 100, 0) == b"print(1)"
        assert _pairs(a, "--dir") == ["/work/pkg"]
        assert "0755" in _pairs(a, "--perms")
        assert a[a.index("--chdir") + 1] == "/work"
        assert a[-3:] == ["--", "python3", "main.py"]
        env = {a[i + 1]: a[i + 2] for i, x in enumerate(a) if x == "--setenv"}
        assert env["X"] == "y" and env["HOME"] == "/work"
    finally:
        launch.close_fds()


def test_bwrap_network_and_host_workdir():
    rt = BwrapRuntime(image=Path("/img"), network=True)
    a = rt.command(["true"], env={}, limits=L, host_workdir=Path("/state/s1")).argv
    assert "--share-net" in a
    assert a[a.index("--bind") + 1: a.index("--bind") + 3] == ["/state/s1", "/work"]


def test_bwrap_side_channels_and_seccomp_program():
    """bwrap gets its status pipe, its block pipe and the seccomp program; the launcher inherits the
    ends it hands on, the server keeps the block pipe's writer and the report pipe's reader."""
    from .runtimes import Control
    from .seccomp import filter_program

    control = Control.open(with_seccomp=True)
    try:
        launch = BwrapRuntime(image=Path("/img")).command(["true"], env={}, limits=L, control=control)
        a = launch.argv
        assert _pairs(a, "--json-status-fd") == [str(control.status_w)]
        assert _pairs(a, "--block-fd") == [str(control.block_r)]
        assert _pairs(a, "--seccomp") == [str(control.seccomp_fd)]
        assert a.index("--seccomp") < a.index("--")  # options, not part of the command
        assert os.pread(control.seccomp_fd, 1 << 16, 0) == filter_program()
        assert len(filter_program()) % 8 == 0 and len(filter_program()) > 8 * 40  # sock_filter entries
        assert set(control.child_fds()) == {control.status_r, control.status_w, control.block_r,
                                            control.report_w, control.seccomp_fd}
        assert launch.tmpfs == ["/tmp", "/dev/shm", "/work"]
        cfg = control.launcher_config()
        assert cfg["bwrap_status_fd"] == control.status_r and cfg["report_fd"] == control.report_w
        assert sorted(cfg["bwrap_fds"]) == sorted([control.status_w, control.block_r, control.seccomp_fd])
    finally:
        control.close()
    assert (control.status_r, control.block_w, control.report_r, control.seccomp_fd) == (-1, -1, -1, -1)


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../../b", "a\0b", "."])
def test_paths_must_stay_in_work(bad):
    with pytest.raises(SandboxArgumentError):
        check_path(bad)


def test_paths_ok():
    assert check_path("a/b.py") == PurePosixPath("a/b.py")
    assert check_path("/work/a.py") == PurePosixPath("a.py")


def test_env_rejects_bad_names():
    with pytest.raises(SandboxArgumentError):
        BwrapRuntime(image=Path("/i")).command(["true"], env={"A=B": "1"}, limits=L)


def test_limits_can_only_be_lowered():
    base = Limits(wall_time_s=10, memory_bytes=100)
    got = base.lowered({"wall_time_s": 99, "memory_bytes": 50, "cpu_time_s": 0})
    assert got.wall_time_s == 10 and got.memory_bytes == 50 and got.cpu_time_s == base.cpu_time_s


def test_spec_forbids_unknown_fields():
    SandboxSpec(runtime="apptainer", image="x.sif", network=True)
    with pytest.raises(ValidationError):
        SandboxSpec(runtime="docker")
    with pytest.raises(ValidationError):
        SandboxSpec(imagee="python")
    with pytest.raises(ValidationError):
        SandboxSpec(limits={"wall": 1})
