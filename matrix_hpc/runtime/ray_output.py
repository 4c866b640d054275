"""Ray's worker output (``log_to_driver``) and its error messages ("A worker died ...") into a
file instead of the driver's terminal.

Ray prints both through ``ray._private.worker``: the log lines through a handler of its
stdstream dispatcher, the error messages through ``print_to_stdstream``. Ray has no public
switch that sends them to a file, so this swaps those two for the time of a run and puts
them back afterwards (the borrowed names are reached through ``matrix_hpc._compat``, whose
test fails when a Ray upgrade renames them). If a later Ray renames them, nothing is swapped
and Ray prints as usual.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Callable
from typing import TextIO

from matrix_hpc._compat import ray_worker_module

_HANDLER = "ray_print_logs"
_WARNING_LINE = re.compile(r"^\s*(\(.*?\)\s*)?(WARNING|ERROR|CRITICAL)\b|Traceback \(most recent call last\)")
# vLLM's own log lines ("(EngineCore pid=7) WARNING 12-05 17:00:00 [arg_utils.py:3006] ...", or
# "WARNING:vllm.x:..." before vLLM has set up its logging). Its warnings are about the engine settings
# the llm service chose on purpose (chunked prefill off on CPU, ...), not about the user's run: kept
# in the log file, not counted. Its errors count, except in the teardown (see Warnings.add_from_worker).
_ENGINE_LINE = re.compile(r"\b[A-Z]+ \d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \[[\w./-]+:\d+\]|\b[A-Z]+:vllm\.")
_ENGINE_NOTICE = re.compile(r"\bWARNING \d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \[[\w./-]+:\d+\]|\bWARNING:vllm\.")


def is_engine_line(line: str) -> bool:
    return bool(_ENGINE_LINE.search(line))


def worth_a_warning(line: str) -> bool:
    """Whether a line of a worker's output is a warning the terminal counts for the user."""
    return bool(_WARNING_LINE.search(line)) and not _ENGINE_NOTICE.search(line)


class RayOutputToFile:
    def __init__(self, stream: TextIO, on_warning: Callable[[str], None]):
        self.stream = stream
        self.on_warning = on_warning
        self.lock = threading.Lock()
        self._saved: tuple | None = None

    def install(self) -> None:
        try:
            worker = ray_worker_module()
            dispatcher = worker.global_worker_stdstream_dispatcher
            handler = dict(dispatcher.handlers).get(_HANDLER)
            printer = worker.print_to_stdstream
        except (ImportError, AttributeError):
            return
        if handler is not None:
            dispatcher.remove_handler(_HANDLER)
            dispatcher.add_handler(_HANDLER, self.write)
        worker.print_to_stdstream = self.write
        self._saved = (worker, dispatcher, handler, printer)

    def uninstall(self) -> None:
        if self._saved is None:
            return
        with self.lock:  # a batch being written finishes first; later ones are dropped, not written
            worker, dispatcher, handler, printer = self._saved
            self._saved = None
        # outside our lock: Ray calls write() holding its dispatcher's lock, which this takes
        worker.print_to_stdstream = printer
        if handler is not None and _HANDLER in dict(dispatcher.handlers):  # ray.shutdown() removes it
            dispatcher.remove_handler(_HANDLER)
            dispatcher.add_handler(_HANDLER, handler)

    def write(self, data: dict, ignore_prefix: bool = False) -> None:
        """Ray's batch of lines from one process: ``{"lines", "pid", "actor_name", "task_name", ...}``."""
        who = data.get("actor_name") or data.get("task_name") or ""
        prefix = "" if ignore_prefix else f"({who} pid={data.get('pid')}) " if who else f"({data.get('pid')}) "
        is_ray_error = data.get("pid") == "raylet"
        with self.lock:
            if self._saved is None:
                return
            for line in data.get("lines", []):
                self.stream.write(f"{prefix}{line}\n")
                if is_ray_error or worth_a_warning(line):
                    self.on_warning(line)


class NativeStderrToFile:
    """The driver's file descriptor 2 into a file for the time of a run: Ray's C++ core worker writes
    its log lines there ("core_worker.cc:...: Actor ... has constructor arguments in the object store
    and max_restarts > 0"), past Python. What Python prints to ``sys.stderr`` still reaches the
    terminal, through a duplicate of the old descriptor. Only when ``sys.stderr`` is the process's
    own (the command line; not under a test's capture)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.previous_stderr: TextIO | None = None
        self._saved: tuple | None = None

    def install(self) -> TextIO | None:
        """Swap; return the terminal's new stream (None if nothing was swapped)."""
        if sys.stderr is not sys.__stderr__ or sys.__stderr__ is None:
            return None
        try:
            fd = sys.__stderr__.fileno()
        except (OSError, ValueError):
            return None
        sys.stderr.flush()
        terminal = os.fdopen(os.dup(fd), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
        self.stream.flush()
        os.dup2(self.stream.fileno(), fd)
        self._saved = (fd, sys.stderr, terminal)
        self.previous_stderr, sys.stderr = sys.stderr, terminal
        return terminal

    def uninstall(self) -> None:
        if self._saved is None:
            return
        fd, previous, terminal = self._saved
        self._saved = None
        terminal.flush()
        os.dup2(terminal.fileno(), fd)
        sys.stderr = previous
        terminal.close()
