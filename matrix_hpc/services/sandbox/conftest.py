"""Fixtures of the sandbox tests: the real image (cached builder), real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator

import pytest

from .spec import Limits, SandboxSpec


def _needs() -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (make system)"
    if os.geteuid() != 0 and shutil.which("debootstrap") is None:
        return "needs root or a built image"
    return None


@pytest.fixture(scope="session")
def python_image():
    why = _needs()
    if why:
        pytest.skip(why)
    from .image import build_image

    return build_image("python", quiet=True)  # the same cached builder as `make image`


class LoopThread:
    """An event loop in a thread: servers live on it; tests submit coroutines and wait."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def aloop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


TEST_LIMITS = Limits(wall_time_s=10, cpu_time_s=5, memory_bytes=256 << 20, max_processes=32,
                     max_output_bytes=64 << 10, max_file_bytes=16 << 20, work_dir_bytes=32 << 20)


@pytest.fixture(scope="module")
def make_server(python_image, aloop):
    """Start SandboxServers on 127.0.0.1 (stopped at module end); returns (server, address)."""
    from .server import SandboxServer

    started = []

    def make(**spec_kw):
        spec_kw.setdefault("limits", TEST_LIMITS)
        spec = SandboxSpec(image=str(python_image), **spec_kw)

        async def start():
            s = SandboxServer(spec)
            port = await s.start("127.0.0.1", 0)
            return s, f"127.0.0.1:{port}"

        s, addr = aloop.run(start())
        started.append(s)
        return s, addr

    yield make
    for s in started:
        aloop.run(s.stop())
