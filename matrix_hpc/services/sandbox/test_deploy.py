"""deploy() on a real local Ray: replicas as actors, a picklable endpoint used from Ray workers."""

from __future__ import annotations

import asyncio
import os
import pickle
import stat
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest

from matrix_hpc.runtime.security import LocalRay

from . import SandboxEndpoint, SandboxSpec, ServiceError, deploy


@pytest.fixture(scope="module")
def ray_local(python_image, tmp_path_factory):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    with nullcontext() if ray.is_initialized() else LocalRay(
            tmp_path_factory.mktemp("ray"), num_cpus=2, object_store_memory=256 * 1024**2, log_to_driver=False):
        yield ray


def test_deploy_run_release_shutdown(ray_local, tmp_path):
    ray = ray_local
    spec = SandboxSpec(runtime="bwrap", image="python", session_ttl_s=60)
    ep = deploy("py", spec, base_dir=tmp_path)
    try:
        # one machine: a Unix socket in a folder only this user can enter
        assert isinstance(ep, SandboxEndpoint) and ep.addresses[0].startswith("unix:")
        folder = Path(ep.addresses[0][len("unix:"):]).parent
        assert folder.stat().st_uid == os.geteuid() and stat.S_IMODE(folder.stat().st_mode) == 0o700
        ep2 = pickle.loads(pickle.dumps(ep))

        @ray.remote(num_cpus=0)
        def agent_step(endpoint: SandboxEndpoint, task_id: str):
            async def step():
                c = endpoint.client(task_id)
                r = await c.run(["python3", "-c", "print(6 * 7)"])
                s = await c.open_session(files={"a.txt": "kept"})
                r2 = await s.exec("cat a.txt")
                return r.stdout.strip(), r2.stdout, s.id  # the session is left open, as by a dying task

            return asyncio.run(step())

        out, kept, sid = ray.get(agent_step.remote(ep2, "task-7"))
        assert (out, kept) == ("42", "kept")

        async def release_and_check():
            n = await ep.release(["task-7"])
            stats = await ep.client().stats()
            return n, stats

        n, stats = asyncio.run(release_and_check())
        assert n == 1 and stats[0].sessions == 0 and stats[0].runs_total == 2
    finally:
        ep.shutdown()

    async def gone():
        with pytest.raises(ServiceError):
            await ep2.client("x").run(["true"], timeout=3)

    asyncio.run(gone())


def test_deploy_reports_a_missing_image(ray_local, tmp_path):
    with pytest.raises(ServiceError, match="does not exist"):
        deploy("py", {"image": "./no-such-rootfs"}, base_dir=tmp_path)


def test_cli_help_and_cached_image_build(python_image):
    env = dict(os.environ)
    exe = [sys.executable, "-m", "matrix_hpc.cli"]
    h = subprocess.run(exe + ["serve", "sandbox", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert h.returncode == 0 and "--network" in h.stdout and "--image" in h.stdout
    b = subprocess.run(exe + ["image", "build", "python"], capture_output=True, text=True, env=env, timeout=60)
    assert b.returncode == 0 and "(cached)" in b.stdout, b.stderr


def test_cli_serve_standalone(python_image):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "matrix_hpc.cli", "serve", "sandbox", "--port", str(port),
                             "--image", str(python_image), "--max-concurrent", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server is listening
        assert f"127.0.0.1:{port}" in line, line
        from .client import SandboxClient

        r = asyncio.run(SandboxClient([f"127.0.0.1:{port}"]).run("echo standalone"))
        assert r.stdout == "standalone\n"
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
