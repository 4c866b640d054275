"""The live progress line and the end-of-run numbers."""

from __future__ import annotations

import sys
import time


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


class Progress:
    """done / failed / in flight, tasks per second and ETA, on one line (a line every 10 s when
    stderr is not a terminal, so logs stay readable)."""

    def __init__(self, total: int, already: int, *, enabled: bool = True, stream=sys.stderr):
        self.total, self.already = total, already
        self.enabled = enabled
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = self.last_print = time.monotonic()
        self.line = ""

    def update(self, *, done: int, failed: int, in_flight: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done + failed
        rate = finished / (now - self.t0) if now > self.t0 else 0.0
        left = max(0, self.total - self.already - finished)
        eta = _duration(left / rate) if rate > 0 else "?"
        self.line = (f"done {self.already + done}/{self.total}  failed {failed}  in flight {in_flight}  "
                     f"{rate:.1f} tasks/s  ETA {eta}")
        if self.tty:
            self.stream.write("\r" + self.line + "\033[K")
            self.stream.flush()
        elif now - self.last_print >= 10:
            self.last_print = now
            print(self.line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.line:
            self.stream.write("\n")
            self.stream.flush()
