"""What a run shows on the terminal: start-up phases as they happen, one live progress display
(rich) with a summary of warnings below it, and the end-of-run numbers.

Ray's worker output and the runtime's log records go to the run's log file (``logs/run.log``
under the run directory), not the terminal; warnings among them are counted for the display.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from matrix_hpc.rundir import RUN_LOG
from matrix_hpc.runtime.ray_output import NativeStderrToFile, RayOutputToFile, is_engine_line

_WARNINGS_SHOWN = 3
_PLAIN_EVERY_S = 10  # a progress line this often when the terminal is not a terminal (a log file)


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"p50": 0.0, "p99": 0.0, "n": 0}
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99), "n": len(s)}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def describe_actors(spec) -> str:
    """``starting 5 actors: source, 1 sink, f x2, g x1``."""
    roles = ", ".join(f"{role} x{rs.replicas}" for role, rs in spec.roles.items())
    n = 1 + spec.run.sinks + sum(rs.replicas for rs in spec.roles.values())
    return f"starting {n} actors: source, {spec.run.sinks} sink{'s' * (spec.run.sinks > 1)}, {roles}"


class _Console(Console):
    """A console that never hides the terminal's cursor: rich's live display hides it until it stops,
    and a run killed with -9 (or by the OOM killer) never stops it, leaving the user's terminal with
    no cursor. A visible cursor at the end of the progress line is the price."""

    def show_cursor(self, show: bool = True) -> bool:
        return self.is_terminal


def _console(stream: TextIO | None) -> Console:
    return _Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)


class Warnings:
    """Warnings seen during a run, counted by kind (numbers blanked out), for the summary line."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()
        self.example: dict[str, str] = {}
        self.lock = threading.Lock()
        self.work_over = False  # set once every task is committed or saved (Progress.close)

    def add_from_worker(self, line: str) -> None:
        """A warning line of a Ray worker's output. An engine's lines after the run's work is over are
        its teardown (vLLM's "EngineDeadError" as it is shut down): kept in the log only."""
        if not (self.work_over and is_engine_line(line)):
            self.add(line)

    def add(self, message: str) -> None:
        first = message.strip().splitlines()[0][:160] if message.strip() else ""
        kind = re.sub(r"\d+", "N", first)
        with self.lock:
            self.kinds[kind] += 1
            self.example.setdefault(kind, first)

    def lines(self, log_file: Path | None) -> list[str]:
        with self.lock:
            common = self.kinds.most_common()
        if not common:
            return []
        out = [f"warnings: {sum(n for _, n in common)}" + (f" (details in {log_file})" if log_file else "")]
        out += [f"  {n} x {self.example[kind]}" for kind, n in common[:_WARNINGS_SHOWN]]
        if len(common) > _WARNINGS_SHOWN:
            out.append(f"  ... and {len(common) - _WARNINGS_SHOWN} other kind(s)")
        return out


class _CountingHandler(logging.Handler):
    def __init__(self, warnings: Warnings):
        super().__init__(logging.WARNING)
        self.warnings = warnings

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings.add(record.getMessage())


class Terminal:
    """A run's terminal: phases, then the progress display; closes with the warnings summary."""

    def __init__(self, *, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.console = _console(stream)
        self.warnings = Warnings()
        self.log_file: Path | None = None
        self._phase: tuple[str, float] | None = None
        self._status = None
        self._progress: Progress | None = None
        self._undo: list = []

    # -- start-up phases ------------------------------------------------------------------------
    def phase(self, text: str) -> None:
        """A start-up phase begins (and the one before it ends)."""
        self._end_phase()
        self._phase = (text, time.monotonic())
        if not self.enabled:
            return
        if self.console.is_terminal:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self.console.print(f"{text} ...")

    def _end_phase(self) -> None:
        if self._phase is None:
            return
        text, t0 = self._phase
        self._phase = None
        if self._status is not None:
            self._status.stop()
            self._status = None
        if self.enabled and self.console.is_terminal:
            self.console.print(f"[green]✓[/] {text} [dim]({time.monotonic() - t0:.1f}s)[/]")

    # -- where output goes ----------------------------------------------------------------------
    def capture(self, log_dir: Path) -> None:
        """Send Ray's worker output and matrix_hpc's log records to ``log_dir/run.log``, counting warnings."""
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = log_dir / RUN_LOG
        stream = self.log_file.open("a", buffering=1)
        ray_out = RayOutputToFile(stream, self.warnings.add_from_worker)
        ray_out.install()
        native = NativeStderrToFile(stream)
        terminal, console_file = native.install(), self.console.file
        if terminal is not None and console_file is native.previous_stderr:
            self.console.file = terminal
        to_file = logging.StreamHandler(stream)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        counting = _CountingHandler(self.warnings)
        logger = logging.getLogger("matrix_hpc")
        level, propagate = logger.level, logger.propagate
        logger.addHandler(to_file)
        logger.addHandler(counting)
        logger.propagate = False  # the terminal shows the summary, the file the records
        if level == logging.NOTSET or level > logging.INFO:
            logger.setLevel(logging.INFO)

        def undo() -> None:
            self.console.file = console_file
            native.uninstall()
            ray_out.uninstall()
            logger.removeHandler(to_file)
            logger.removeHandler(counting)
            logger.setLevel(level)
            logger.propagate = propagate
            stream.close()

        self._undo.append(undo)

    # -- the run --------------------------------------------------------------------------------
    def progress(self, total: int, already: int) -> Progress:
        self._end_phase()
        self._progress = Progress(total, already, enabled=self.enabled, console=self.console,
                                  warnings=self.warnings, log_file=self.log_file)
        return self._progress

    def close(self) -> None:
        """End the last phase and the display, put Ray's output back, print the warnings summary
        (also with the display off: it is the terminal's only word about them)."""
        self._end_phase()
        if self._progress is not None:
            self._progress.close()
        while self._undo:
            self._undo.pop()()
        for line in self.warnings.lines(self.log_file):
            self.console.print(line, style="yellow", markup=False)


class Progress:
    """done / failed / in flight, rows committed per second since the first row was sent (the run's
    one throughput, store/throughput.py) and ETA: a live bar on a terminal (warnings
    summarized below it), a line every 10 s otherwise, so logs stay readable."""

    def __init__(self, total: int, already: int, *, enabled: bool = True, stream: TextIO | None = None,
                 console: Console | None = None, warnings: Warnings | None = None, log_file: Path | None = None):
        self.total, self.already = total, already
        self.enabled = enabled
        self.console = console or _console(stream)
        self.warnings = warnings or Warnings()
        self.log_file = log_file
        self.t0 = self.last_print = time.monotonic()
        self.line = ""
        self.done = 0
        self.live: Live | None = None
        if enabled and self.console.is_terminal:
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def update(self, *, done: int, failed: int, in_flight: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done + failed
        rate = finished / (now - self.t0) if now > self.t0 else 0.0
        left = max(0, self.total - self.already - finished)
        eta = _duration(left / rate) if rate > 0 else "?"
        self.done = self.already + finished
        self.line = (f"done {self.already + done}/{self.total}  failed {failed}  in flight {in_flight}  "
                     f"{rate:.1f} rows/s  ETA {eta}")
        if self.live is not None:
            self.live.update(self._render())
        elif now - self.last_print >= _PLAIN_EVERY_S:
            self.last_print = now
            self.console.print(self.line, markup=False)

    def _render(self) -> Group:
        row = Table.grid(padding=(0, 1))
        row.add_row(ProgressBar(total=max(self.total, 1), completed=self.done, width=24),
                    Text(self.line or "starting ...", no_wrap=True, overflow="ellipsis"))
        return Group(row, *(Text(line, style="yellow") for line in self.warnings.lines(self.log_file)))

    def close(self) -> None:
        self.warnings.work_over = True  # what engines say from here on is their teardown
        if self.live is not None:
            self.live.update(Text(self.line))  # the final numbers stay; the warnings follow once
            self.live.stop()
            self.live = None
