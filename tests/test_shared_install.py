"""One install serves every user: the cache that root built (the converted model, the sandbox image)
is used, read-only, by an ordinary user who runs the main example job on it; and a user with no
built image at all still gets a sandbox (the node's own /usr, read-only).

Real parts: `matrix-hpc run` as the test user, a local Ray, the vLLM CPU engine, bubblewrap over
the built image. Two problems (the job folder copied into the user's folder with a smaller
dataset) keep it as short as an engine start allows.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_runtime import results

from matrix_hpc import load_job
from matrix_hpc.paths import cache_dir
from matrix_hpc.services.llm.embedded import build as build_model
from matrix_hpc.services.llm.embedded import is_built as model_is_built
from matrix_hpc.store import RunStore

REPO = Path(__file__).resolve().parent.parent
ROWS = 2

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make system)")
SANDBOXED = """
from matrix_hpc import DONE

async def compute(item, ctx):
    result = await ctx.sandbox("py").run(["python3", "-c", f"print({item.n} * 2)"])
    item.text = result.stdout.strip() or result.stderr or result.error
    return DONE
"""


@pytest.mark.slow
def test_an_ordinary_user_without_a_built_image_gets_the_rootless_sandbox(make_job, unprivileged_user, user_dir):
    user = unprivileged_user
    path = make_job(SANDBOXED, {"compute": {"agent": "agents:compute"}}, "compute", rows=3,
                    services={"sandbox": {"py": {"image": "python"}}})
    job_dir = user_dir / "job"
    shutil.copytree(path.parent, job_dir)
    empty_cache = user_dir / "cache"
    empty_cache.mkdir()
    for p in [job_dir, *job_dir.rglob("*"), empty_cache]:
        os.chown(p, user.uid, user.gid)
    run_dir = user_dir / "run"
    r = user.run([sys.executable, "-m", "matrix_hpc.cli", "run", str(job_dir / "job.yaml"), "-o", str(run_dir),
                  "--json"], env={"MATRIX_HPC_CACHE": str(empty_cache)}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert ("deploying sandbox service 'py' (bwrap, a read-only view of this node's /usr (rootless, no built image); "
            "image 'python' is not built) ...") in r.stderr.splitlines()
    assert sorted(p.text for _, p in results(load_job(job_dir / "job.yaml", run_dir=run_dir))) == ["0", "2", "4"]
    assert list(empty_cache.iterdir()) == []


@pytest.fixture
def root_cache() -> Path:
    """The cache as root leaves it: built (no-ops when it is), and shared readable."""
    from matrix_hpc.services.sandbox.image import build_image

    build_model()  # also makes a folder built before files were shared readable by all
    build_image("python", quiet=True)
    return cache_dir()


def _user_job(user, user_dir: Path) -> Path:
    job_dir = user_dir / "code_verify"
    shutil.copytree(REPO / "jobs" / "code_verify", job_dir, ignore=shutil.ignore_patterns("__pycache__", "runs"))
    rows = (job_dir / "problems.jsonl").read_text().splitlines(keepends=True)[:ROWS]
    (job_dir / "problems.jsonl").write_text("".join(rows))
    for p in [job_dir, *job_dir.rglob("*")]:
        os.chown(p, user.uid, user.gid)
    return job_dir / "job.yaml"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs a cache that root built (run the suite as root)")
@pytest.mark.skipif(not model_is_built(), reason="the embedded model is not built: run `make model`")


def test_an_ordinary_user_runs_code_verify_on_the_cache_root_built(root_cache, unprivileged_user, user_dir):
    user = unprivileged_user
    model, image = root_cache / "models" / "smollm2-135m", root_cache / "images" / "python"
    for path in (root_cache, model, image, model / "model.safetensors"):
        assert path.stat().st_uid == 0
        assert user.run(["test", "-w", str(path)]).returncode == 1, path  # read-only for the user
    job, run_dir = _user_job(user, user_dir), user_dir / "run"
    state = user_dir / "state"  # the user's own folder: vLLM's cache goes there, never in the install
    env = {"MATRIX_HPC_CACHE": str(root_cache), "MATRIX_HPC_STATE": str(state)}
    r = user.run([sys.executable, "-m", "matrix_hpc.cli", "run", str(job), "-o", str(run_dir), "--json"],
                 env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"deploying sandbox service 'py' (bwrap, image 'python' built at {image}) ..." in r.stderr.splitlines()
    summary = json.loads(r.stdout.splitlines()[-1])
    assert (summary["done"], summary["failed"], summary["total"]) == (ROWS, 0, ROWS)
    assert RunStore.open(run_dir).status()["done"] == ROWS
    assert run_dir.stat().st_uid == user.uid
    assert [(p.name, p.stat().st_uid, p.stat().st_mode & 0o777) for p in (state, state / "vllm")] == [
        ("state", user.uid, 0o700), ("vllm", user.uid, 0o700)]
