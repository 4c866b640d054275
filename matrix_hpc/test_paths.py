"""The shared cache is readable by every user whatever the builder's umask; the per-user state
folder is its owner's alone (or refused, with the fix)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from matrix_hpc.paths import StateDirError, make_shared_dir, share_tree, state_dir


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture
def private_umask():
    previous = os.umask(0o077)  # what `matrix-hpc` itself runs under
    yield
    os.umask(previous)


def test_a_tree_written_under_umask_077_is_shared_readable(tmp_path, private_umask):
    root = make_shared_dir(tmp_path / "cache" / "models")
    assert [_mode(p) for p in (tmp_path / "cache", root)] == [0o755, 0o755]
    model = root / "m"
    (model / "sub").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"w")
    (model / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(model / "sub" / "run.sh", 0o700)
    (model / "link").symlink_to("/etc/hostname")
    share_tree(model)
    assert {str(p.relative_to(model)): _mode(p) for p in model.rglob("*") if not p.is_symlink()} == {
        "model.safetensors": 0o644, "sub": 0o755, "sub/run.sh": 0o755}
    assert _mode(model) == 0o755
    assert (model / "link").is_symlink()


def test_a_model_folder_built_before_sharing_is_fixed_by_a_no_op_build(tmp_path, monkeypatch, private_umask):
    from matrix_hpc.services.llm import embedded

    monkeypatch.setenv("MATRIX_HPC_CACHE", str(tmp_path))
    folder = embedded.model_dir()
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w")  # 0600, as safetensors left it
    (folder / ".matrix-hpc-complete").write_text(f"test, dtype {embedded.DTYPE}\n")
    assert embedded.build() == folder  # already built: nothing converted
    assert {p.name: _mode(p) for p in folder.iterdir()} == {"model.safetensors": 0o644,
                                                             ".matrix-hpc-complete": 0o644}


def test_the_state_folder_is_made_owner_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MATRIX_HPC_STATE", str(tmp_path / "state"))
    assert state_dir() == tmp_path / "state"
    assert _mode(tmp_path / "state") == 0o700
    monkeypatch.delenv("MATRIX_HPC_STATE")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "matrix-hpc"


def test_a_state_folder_others_can_reach_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "state"
    d.mkdir()
    os.chmod(d, 0o750)
    monkeypatch.setenv("MATRIX_HPC_STATE", str(d))
    with pytest.raises(StateDirError) as e:
        state_dir()
    assert str(e.value) == (f"{d} (the matrix-hpc state folder) has mode 0750: other users can reach it; "
                            f"fix it with: chmod 700 {d}")


def test_a_state_folder_of_another_user_is_refused(tmp_path, monkeypatch, unprivileged_user):
    if os.geteuid() != 0:
        pytest.skip("needs a folder that belongs to another user (run the suite as root)")
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    os.chown(d, unprivileged_user.uid, unprivileged_user.gid)
    monkeypatch.setenv("MATRIX_HPC_STATE", str(d))
    with pytest.raises(StateDirError) as e:
        state_dir()
    assert str(e.value) == (f"{d} (the matrix-hpc state folder) belongs to uid {unprivileged_user.uid}, not to "
                            "you (uid 0): set MATRIX_HPC_STATE to a folder of your own")
