"""The one throughput of a run: rows committed (done or failed) per second of processing, where
processing is the time from a run's first row sent to its last commit, summed over the sessions
of a run directory (the first run and each resume; no start-up, no time between sessions).

The progress line, a run's summary, its final event and ``status`` all use it. A session starts
with a ``sending`` event (its run id and time) and ends with its summary's event
(``processing_s``); a session that has not ended (still running, or killed) ends at its last commit.
Commits are attributed to sessions by writer id (``<run id>-sink-<i>``).
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable

SENDING = "sending"  # the event a run writes when its source starts sending rows
ENDED = ("finished", "interrupted", "stopped")  # the events a run's summary writes


def rate(rows: int, seconds: float) -> float | None:
    return round(rows / seconds, 2) if seconds > 0 else None


def processing_seconds(events: Iterable[dict], segments: Iterable) -> float | None:
    """Seconds of processing of every session in ``events``; None if no session is recorded."""
    starts: dict[str, int] = {}  # run id -> ns
    ended: dict[str, float] = {}
    for e in events:
        rid = e.get("run_id")
        if e.get("kind") == SENDING and rid:
            starts[rid] = _epoch_ns(e["time"])
        elif e.get("kind") in ENDED and rid in starts and "processing_s" in e:
            ended[rid] = float(e["processing_s"])
    if not starts:
        return None
    last_commit: dict[str, int] = {}
    for s in segments:
        rid = s.writer.split("-sink-")[0]
        last_commit[rid] = max(last_commit.get(rid, 0), s.time_ns)
    total = 0.0
    for rid, start in starts.items():
        total += ended[rid] if rid in ended else max(0, last_commit.get(rid, start) - start) / 1e9
    return total


def _epoch_ns(iso: str) -> int:
    """``2026-12-05T17:02:08.123Z`` (events.now_iso) -> nanoseconds since the epoch."""
    whole, _, frac = iso.rstrip("Z").partition(".")
    return (calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) * 1000 + int(frac or 0)) * 10**6
