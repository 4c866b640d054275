"""What a run needs is checked before Ray starts: exit status 2 and one line per problem that names
its fix (model, image, cache, run directory, Slurm's commands). RAY_ADDRESS points at a port nobody
listens on, so reaching Ray at all would fail instead of passing. Problems of reach (unreadable,
unwritable) are checked as the ordinary test user (root reads everything)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import deadline

from matrix_hpc import load_job
from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.cli import main
from matrix_hpc.runtime.driver import open_store
from matrix_hpc.runtime.preflight import ResumeRefused, preflight
from matrix_hpc.services.llm.embedded import DTYPE

AGENTS = "from matrix_hpc import DONE\nasync def f(item, ctx):\n    return DONE\n"
ROLES = {"f": {"agent": "agents:f"}}
LLM = {"llm": {"smol": {"backend": "vllm", "model": "smollm2-135m"}}}
FIX_MODEL = ("ask its owner to run `chmod -R a+rX {folder}` (or `make model` as the owner), or set MATRIX_HPC_CACHE "
             "to a cache of your own and run `make model`")
NO_RAY = {"RAY_ADDRESS": "127.0.0.1:9"}


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    d = tmp_path / "cache"
    d.mkdir()
    monkeypatch.setenv("MATRIX_HPC_CACHE", str(d))
    return d


@pytest.fixture
def user_cache(user_dir) -> Path:
    """A cache the test user can reach (pytest's tmp_path is root-only), made by the suite's user."""
    d = user_dir / "cache"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    return d


def _fake_model(cache: Path, weights_mode: int = 0o644) -> Path:
    """A built-looking embedded model folder (never loaded: the checks stop the run before)."""
    folder = cache / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / ".matrix-hpc-complete").write_text(f"test, dtype {DTYPE}\n")
    os.chmod(folder / ".matrix-hpc-complete", 0o644)  # whatever the umask (the CLI's is 077)
    (folder / "model.safetensors").write_bytes(b"x")
    os.chmod(folder / "model.safetensors", weights_mode)
    for d in (cache, cache / "models", folder):
        os.chmod(d, 0o755)
    return folder


def _as_user(user, user_dir: Path, job_yaml: Path, cache: Path, *args: str):
    """``matrix-hpc run`` of a copy of the job folder that belongs to ``user``."""
    job_dir = user_dir / "job"
    shutil.copytree(job_yaml.parent, job_dir)
    for p in [job_dir, *job_dir.rglob("*")]:
        os.chown(p, user.uid, user.gid)
    argv = [sys.executable, "-m", "matrix_hpc.cli", "run", str(job_dir / "job.yaml"), "--no-progress", *args]
    return user.run(argv, env={**NO_RAY, "MATRIX_HPC_CACHE": str(cache)}, timeout=120)


def test_a_model_that_is_not_built(make_job, no_ray, cache, capsys):
    path = make_job(AGENTS, ROLES, "f", rows=2, services=LLM)
    with deadline(60):
        assert main(["run", str(path)]) == 2
    folder = cache / "models" / "smollm2-135m"
    assert capsys.readouterr().err == (
        f"error: services.llm.smol: the embedded model 'smollm2-135m' is not built yet at {folder}: run `make model` "
        "(python -m matrix_hpc.services.llm.embedded)\n")
    assert not load_job(path).run_dir.exists()  # nothing made before the checks


def test_an_image_that_is_not_built_where_no_fallback_applies(make_job, no_ray, cache, capsys):
    sandbox = {"sandbox": {"py": {"image": "python", "host_fallback": False}}}
    path = make_job(AGENTS, ROLES, "f", rows=2, services=sandbox)
    with deadline(60):
        assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"error: services.sandbox.py: image 'python' is not built in {cache / 'images'}: build it as root with "
        "`matrix-hpc image build python` (or `make image`), or use `image: host` (bwrap: the node's own /usr, "
        "read-only)\n")


def test_every_problem_is_a_line_of_its_own(make_job, no_ray, cache, capsys):
    services = {**LLM, "sandbox": {"py": {"image": "./no-such-root"}}}
    path = make_job(AGENTS, ROLES, "f", rows=2, services=services)
    with deadline(60):
        assert main(["run", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [ln.split(":")[:2] for ln in lines] == [["error", " services.llm.smol"], ["error", " services.sandbox.py"]]
    assert lines[1] == f"error: services.sandbox.py: image path {path.parent / 'no-such-root'} does not exist"


def test_unreadable_weights_as_an_ordinary_user(make_job, user_cache, unprivileged_user, user_dir):
    folder = _fake_model(user_cache, weights_mode=0o600)  # what safetensors wrote before the cache was shared
    path = make_job(AGENTS, ROLES, "f", rows=2, services=LLM)
    r = _as_user(unprivileged_user, user_dir, path, user_cache, "-o", str(user_dir / "run"))
    assert r.returncode == 2, r
    weights = folder / "model.safetensors"
    owner = "root" if os.geteuid() == 0 else unprivileged_user.name
    assert r.stderr == (f"error: services.llm.smol: model 'smollm2-135m': {weights} is not readable by you "
                        f"(mode 0600, owner {owner}): {FIX_MODEL.format(folder=folder)}\n")
    assert not (user_dir / "run").exists()


def test_an_unreadable_cache_as_an_ordinary_user(make_job, user_cache, unprivileged_user, user_dir):
    if os.geteuid() != 0:
        pytest.skip("needs a cache that belongs to another user (run the suite as root)")
    _fake_model(user_cache)
    os.chmod(user_cache, 0o700)
    path = make_job(AGENTS, ROLES, "f", rows=2, services=LLM)
    r = _as_user(unprivileged_user, user_dir, path, user_cache, "-o", str(user_dir / "run"))
    assert (r.returncode, r.stderr) == (2, (
        f"error: services.llm.smol: the matrix-hpc cache {user_cache} is not readable by you (mode 0700, owner root): "
        f"ask its owner to run `chmod a+rX {user_cache}`, or set MATRIX_HPC_CACHE to a cache of your own\n")), r


def test_a_run_directory_the_user_cannot_write(make_job, user_cache, unprivileged_user, user_dir):
    if os.geteuid() != 0:
        pytest.skip("needs a folder that belongs to another user (run the suite as root)")
    locked = user_dir / "locked"
    locked.mkdir()
    os.chmod(locked, 0o755)  # root's: the user may enter it, not write in it
    path = make_job(AGENTS, ROLES, "f", rows=2)
    r = _as_user(unprivileged_user, user_dir, path, user_cache, "-o", str(locked / "run"))
    assert (r.returncode, r.stderr) == (2, (
        f"error: the run directory {locked / 'run'} cannot be made: {locked} is not writable by you (mode 0755, "
        "owner root): choose a folder of your own with -o DIR (or run.output_dir in the job file)\n")), r


def test_submit_without_slurm_commands(make_job, cache, monkeypatch, tmp_path, capsys):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    path = make_job(AGENTS, ROLES, "f", rows=2)
    with deadline(60):
        assert main(["submit", str(path)]) == 2
    assert capsys.readouterr().err == (
        "matrix-hpc submit: error: Slurm's sbatch, squeue, scontrol, sacct, scancel not found on PATH: run "
        "`matrix-hpc submit` on a Slurm login node, or add Slurm's bin folder to PATH (`matrix-hpc run JOB` needs "
        "no Slurm)\n")
    assert not load_job(path).run_dir.exists()


def test_a_run_whose_start_failed_runs_again_without_force(make_job, no_ray):
    path = make_job(AGENTS, ROLES, "f", rows=3)
    job = load_job(path)
    open_store(job, force=False)  # created, then the start failed: no task committed or saved
    path.write_text(path.read_text().replace('"commit_interval_s": 0.2', '"commit_interval_s": 0.3'))  # the fix
    fixed = load_job(path)
    assert fixed.fingerprint != job.fingerprint
    assert preflight(fixed, force=False) is None
    store, resuming = open_store(fixed, force=False)
    assert (resuming, store.fingerprint) == (False, fixed.fingerprint)


def test_a_run_with_a_committed_row_is_still_guarded(make_job, no_ray):
    path = make_job(AGENTS, ROLES, "f", rows=3)
    job = load_job(path)
    store, _ = open_store(job, force=False)
    writer = store.writer("w0")
    writer.append("r0#0", 0, task_pb2.TASK_STATUS_DONE, task_pb2.Task(task_id="r0#0").SerializeToString())
    writer.flush()
    path.write_text(path.read_text().replace('"commit_interval_s": 0.2', '"commit_interval_s": 0.3'))
    with pytest.raises(ResumeRefused, match="changed since: job_spec"):
        preflight(load_job(path), force=False)
    assert store.committed() == {"r0#0": task_pb2.TASK_STATUS_DONE}
