"""StepThreads: threads are reused, a hung step never makes another wait, idle threads end."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from matrix_hpc.runtime.step_threads import StepThreads


def test_steps_one_after_another_share_one_thread():
    threads = StepThreads("t")

    async def main():
        return [await threads.submit(lambda i: (i, threading.current_thread().name), i).future for i in range(200)]

    got = asyncio.run(main())
    assert [i for i, _ in got] == list(range(200))
    assert {name for _, name in got} == {"t-1"}
    assert threads.started == 1


def test_an_error_reaches_the_step_and_the_thread_goes_on():
    threads = StepThreads("t")

    def fail():
        raise ValueError("bad row")

    async def main():
        with pytest.raises(ValueError, match="bad row"):
            await threads.submit(fail).future
        return await threads.submit(lambda: 7).future

    assert asyncio.run(main()) == 7
    assert threads.started == 1


def test_a_hung_step_holds_up_no_other_and_its_thread_is_not_reused():
    threads = StepThreads("t")
    release = threading.Event()

    async def main():
        hung = threads.submit(release.wait)
        while not hung.running:
            await asyncio.sleep(0.001)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await hung.future
        others = [await threads.submit(threading.current_thread).future for _ in range(5)]
        return hung, others

    hung, others = asyncio.run(main())
    try:
        assert hung.running  # abandoned, still in its step
        assert {t.name for t in others} == {"t-2"}  # the next steps got a new thread, then shared it
        assert threads.started == 2
    finally:
        release.set()


def test_steps_at_once_get_a_thread_each_and_idle_threads_end():
    threads = StepThreads("t", idle_exit_s=0.2)
    barrier = threading.Barrier(8, timeout=10)  # passes only if all 8 steps run at the same time

    async def main():
        return await asyncio.gather(*(threads.submit(barrier.wait).future for _ in range(8)))

    assert sorted(asyncio.run(main())) == list(range(8))
    assert threads.started == 8
    end = time.monotonic() + 10
    while threads.alive and time.monotonic() < end:
        time.sleep(0.01)
    assert threads.alive == 0
