"""The rootless image: where no image is built (an ordinary user, no admin), bwrap runs commands on
a read-only view of the node's own /usr, with the same isolation as a built image.

MATRIX_HPC_CACHE points at an empty folder: nothing is built there. The server runs as root (in
this process) and as the ordinary test user (``matrix-hpc serve sandbox``, a process of its own).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from .client import SandboxClient
from .conftest import TEST_LIMITS
from .hostview import HostView
from .image import ImageError, describe_image, resolve_image
from .spec import SandboxSpec

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (make system)")

# Prints one line per check; the host's listener port comes as argv[1].
PROBE = r"""
import os, socket, sys
s = socket.socket(); s.settimeout(3)
try:
    s.connect(("127.0.0.1", int(sys.argv[1]))); print("network: CONNECTED")
except OSError:
    print("network: unreachable")
print("interfaces:", sorted(l.split(":")[0].strip() for l in open("/proc/net/dev") if ":" in l))
for path in ("/x", "/usr/x", "/etc/x", "/bin/x"):
    try:
        open(path, "w"); print("wrote", path)
    except OSError as e:
        print("read-only" if e.errno == 30 else f"refused {e.errno}", path)
open("/work/out.txt", "w").write("ok"); print("work:", open("/work/out.txt").read())
print("root:", sorted(os.listdir("/")))
print("etc:", sorted(n for n in os.listdir("/etc") if n in ("passwd", "shadow", "hostname", "hosts")))
print("uid:", os.getuid())
"""


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MATRIX_HPC_CACHE", str(cache))
    return cache


def test_a_missing_image_falls_back_to_the_host_view_for_bwrap_only(empty_cache):
    view = resolve_image("python")
    assert isinstance(view, HostView) and str(view) == "host"
    assert resolve_image("host") == view
    assert describe_image("python", view) == ("a read-only view of this node's /usr (rootless, no built image); "
                                              "image 'python' is not built")
    with pytest.raises(ImageError) as no_fallback:
        resolve_image("python", fallback=False)
    assert str(no_fallback.value) == (
        f"image 'python' is not built in {empty_cache / 'images'}: build it as root with `matrix-hpc image build "
        "python` (or `make image`), or use `image: host` (bwrap: the node's own /usr, read-only)")
    with pytest.raises(ImageError, match=r"not built in .*\(or `make image`\)$"):
        resolve_image("python", runtime="apptainer")
    with pytest.raises(ImageError, match="is for the bwrap runtime, not apptainer"):
        resolve_image("host", runtime="apptainer")


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    return srv


def _check_probe(stdout: str) -> None:
    lines = stdout.splitlines()
    assert lines[:7] == ["network: unreachable", "interfaces: ['lo']", "read-only /x", "read-only /usr/x",
                         "read-only /etc/x", "read-only /bin/x", "work: ok"], stdout
    root = set(ast.literal_eval(lines[7].removeprefix("root: ")))
    assert root <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "proc", "dev", "tmp", "work"}
    assert lines[8:] == ["etc: []", "uid: 1000"], stdout


def test_the_host_view_runs_python3_isolated_as_root(empty_cache, aloop):
    from .server import SandboxServer

    async def start():
        server = SandboxServer(SandboxSpec(image="python", limits=TEST_LIMITS))
        return server, await server.start("127.0.0.1", 0)

    server, port = aloop.run(start())
    srv = _listener()
    try:
        client = SandboxClient([f"127.0.0.1:{port}"], key="t", default_wall_s=10)
        r = aloop.run(client.run(["python3", "-c", PROBE, str(srv.getsockname()[1])]))
        assert (r.exit_code, r.error, r.stderr) == (0, "", ""), r
        _check_probe(r.stdout)
    finally:
        srv.close()
        aloop.run(server.stop())


def test_the_host_view_runs_python3_isolated_as_an_ordinary_user(unprivileged_user, user_dir, aloop):
    """No root, no image, no admin: `serve sandbox --image python` names the view it fell back to."""
    cache = user_dir / "cache"
    cache.mkdir()
    os.chown(cache, unprivileged_user.uid, unprivileged_user.gid)
    argv = [sys.executable, "-m", "matrix_hpc.cli", "serve", "sandbox", "--port", "0", "--image", "python",
            "--max-concurrent", "2", "--wall-time", "10", "--cpu-time", "5"]
    proc = subprocess.Popen(unprivileged_user.command(argv, {"MATRIX_HPC_CACHE": str(cache)}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    srv = _listener()
    try:
        lines = iter(proc.stdout.readline, "")  # its log and its start line, once it serves (EOF: it failed)
        line = next((ln for ln in lines if ln.startswith("sandbox service")), "")
        m = re.fullmatch(r"sandbox service \(bwrap, a read-only view of this node's /usr \(rootless, no built "
                         r"image\); image 'python' is not built\) on 127\.0\.0\.1:(\d+)\n", line)
        assert m, line
        client = SandboxClient([f"127.0.0.1:{m.group(1)}"], key="u", default_wall_s=10)
        r = aloop.run(client.run(["python3", "-c", PROBE, str(srv.getsockname()[1])]))
        assert (r.exit_code, r.error, r.stderr) == (0, "", ""), r
        _check_probe(r.stdout)
        assert list(cache.iterdir()) == []  # nothing written into the cache
    finally:
        srv.close()
        os.killpg(proc.pid, signal.SIGTERM)  # runuser and the server: the server removes its state
        proc.wait(30)
        proc.stdout.close()
