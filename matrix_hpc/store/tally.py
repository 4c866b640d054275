"""Steps and retries counted in committed task envelopes: what a summary or ``status`` reports
as done by each role is what the store holds, however often actors died or the run resumed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from matrix_hpc._gen.v1 import task_pb2


@dataclass
class Tally:
    done: int = 0
    failed: int = 0
    steps: dict[str, int] = field(default_factory=dict)  # role -> steps in the tasks' traces
    retries: int = 0  # step tries that raised and were tried again
    service_waits: int = 0  # step tries that met an unavailable service and were tried again
    unreadable: int = 0  # envelopes that are not Task messages (a damaged heap)


def tally(envelopes: Iterable[bytes]) -> Tally:
    """Count the tasks, their steps by role and their retries in ``envelopes`` (serialized Tasks)."""
    steps: Counter[str] = Counter()
    done = retries = waits = n = bad = 0
    for data in envelopes:
        try:
            task = task_pb2.Task.FromString(data)
        except DecodeError:
            bad += 1
            continue
        n += 1
        done += task.status == task_pb2.TASK_STATUS_DONE
        steps.update(task.trace)
        retries += task.retries
        waits += task.service_waits
    return Tally(done, n - done, dict(sorted(steps.items())), retries, waits, bad)
