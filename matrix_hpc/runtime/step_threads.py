"""The threads that run a synchronous agent's steps, off the actor's event loop.

A thread that finished a step takes the next one: starting a thread per step cost about half of
an agent actor's CPU on short steps (benchmarks/README.md, the coral workflow). When no thread is
idle a new one starts, so a step never waits for a thread, and a thread stuck in a step that ran
past its timeout (Python cannot stop it) holds up no other step. A thread idle for ``idle_exit_s``
ends, so a burst's threads do not outlive it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable


class StepJob:
    """One step handed to a thread: ``future`` (of the submitting loop) gets its outcome; ``running``
    says whether a thread is still in it (after a timeout: still running, its outcome dropped)."""

    def __init__(self, fn: Callable, args: tuple, loop: asyncio.AbstractEventLoop):
        self.fn, self.args, self.loop = fn, args, loop
        self.future: asyncio.Future = loop.create_future()
        self.running = False

    def run(self) -> tuple:
        value, error = None, None
        self.running = True
        try:
            value = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting step, which records it
            error = e
        finally:
            self.running = False
        return value, error

    def hand_back(self, outcome: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self._settle, *outcome)
        except RuntimeError:  # the loop is closed: the actor is stopping and nobody waits for it
            pass

    def _settle(self, value, error) -> None:
        if self.future.done():  # cancelled by the step's timeout
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(value)


class StepThreads:
    def __init__(self, name: str, idle_exit_s: float = 30.0):
        self.name = name
        self.idle_exit_s = idle_exit_s
        self._jobs: queue.SimpleQueue[StepJob] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job that no submitted job has claimed yet
        self.alive = 0
        self.started = 0

    def submit(self, fn: Callable, *args) -> StepJob:
        """Run ``fn(*args)`` in a thread (an idle one, else a new one); await ``.future`` for its outcome."""
        job = StepJob(fn, args, asyncio.get_running_loop())
        with self._lock:
            spawn = self._idle == 0
            if spawn:
                self.alive += 1
                self.started += 1
                number = self.started
            else:
                self._idle -= 1
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._work, name=f"{self.name}-{number}", daemon=True).start()
        return job

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_exit_s)
            except queue.Empty:
                with self._lock:
                    if self._idle == 0:  # every waiting thread is claimed: a job is on its way
                        continue
                    self._idle -= 1
                    self.alive -= 1
                    return
            outcome = job.run()
            with self._lock:  # idle before the step's outcome is handed back: its next step finds this thread
                self._idle += 1
            job.hand_back(outcome)
