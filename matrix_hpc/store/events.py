"""The run's event log: ``logs/events.jsonl``, one JSON object a line, appended by any process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from matrix_hpc.store.layout import now_iso


class EventLog:
    def __init__(self, path: Path):
        self.path = path

    def append(self, kind: str, **fields) -> None:
        """Append one line (a single write with O_APPEND: lines of concurrent writers never interleave)."""
        rec = {"time": now_iso(), "kind": kind, "host": socket.gethostname(), "pid": os.getpid(), **fields}
        line = (json.dumps(rec, default=str) + "\n").encode()
        self.path.parent.mkdir(exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut off by a crash
                continue
        return out
