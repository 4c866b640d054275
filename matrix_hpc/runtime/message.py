"""Building and reading task envelopes (``matrix_hpc.v1.Task``)."""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Callable
from typing import Any

from google.protobuf import json_format

from matrix_hpc._gen.v1 import task_pb2
from matrix_hpc.job.dataset import RowError, row_failure
from matrix_hpc.job.dataset_checks import column_fields, unused_columns
from matrix_hpc.job.spec import DONE

Task = task_pb2.Task
RUNNING, DONE_STATUS, FAILED = task_pb2.TASK_STATUS_RUNNING, task_pb2.TASK_STATUS_DONE, task_pb2.TASK_STATUS_FAILED


def task_id(row_id: str, trial: int) -> str:
    return f"{row_id}#{trial}"


def task_seed(run_seed: int, tid: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{tid}".encode()).digest()[:8], "little") >> 1


def set_error(task: Task, role: str, exc: BaseException | str, attempts: int = 1) -> None:
    """Finish ``task`` as failed, recording who failed and why."""
    task.status = FAILED
    task.next_role = DONE
    task.error.role = role
    task.error.step = task.step
    task.error.attempts = attempts
    if isinstance(exc, BaseException):
        task.error.message = f"{type(exc).__name__}: {exc}"
        task.error.traceback = "".join(traceback.format_exception(exc))
    else:
        task.error.message = exc
    task.updated.GetCurrentTime()


def undeliverable(data: bytes, why: str, attempts: int = 1) -> bytes:
    """The message ``data`` as a failed task: it could not be sent to its next role."""
    task = Task.FromString(data)
    set_error(task, task.next_role, why, attempts=attempts)
    return task.SerializeToString()


class TaskFactory:
    """Turns dataset rows into fresh task envelopes (in the source actor)."""

    def __init__(self, spec, payload_cls: type, builder: Callable | None):
        self.spec = spec
        self.payload_cls = payload_cls
        self.builder = builder
        self.fills = column_fields(spec, payload_cls.DESCRIPTOR) or {}

    def row_id(self, index: int, row: dict[str, Any] | RowError) -> str:
        field = self.spec.dataset.id_field
        if field is None or isinstance(row, RowError) or field not in row:
            return str(index)
        return str(row[field])

    def new(self, index: int, row: dict[str, Any] | RowError, trial: int, where: str = "") -> Task:
        rid = self.row_id(index, row)
        tid = task_id(rid, trial)
        task = Task(task_id=tid, row_index=index, row_id=rid, trial=trial, status=RUNNING,
                    next_role=self.spec.first_role, seed=task_seed(self.spec.run.seed, tid))
        task.created.GetCurrentTime()
        task.updated.CopyFrom(task.created)
        try:
            if isinstance(row, RowError):
                raise row
            field = self.spec.dataset.id_field
            if field is not None and field not in row:
                raise RowError(f"no id field {field!r}")
            task.payload.Pack(self._payload(row))
        except Exception as e:  # noqa: BLE001 - a bad row fails its own task only
            known = self.spec.dataset.id_field is None or (isinstance(row, dict) and self.spec.dataset.id_field in row)
            set_error(task, "source", row_failure(e, where or f"row {index}", rid if known else None))
        return task

    def _payload(self, row: dict[str, Any]):
        if self.builder is not None:
            payload = self.builder(row, self.payload_cls)
            if not isinstance(payload, self.payload_cls):
                raise TypeError(f"payload builder returned {type(payload).__name__}, not {self.payload_cls.__name__}")
            return payload
        mapping = self.spec.payload.from_row
        if mapping is not None:
            missing = [col for col in mapping.values() if col not in row]
            if missing:
                raise RowError(f"row has no column(s) {missing} named in payload.from_row")
        unused = unused_columns(self.spec, self.fills, row)
        if unused:  # the loader checked the first rows' columns; this is a later row
            raise RowError(f"column(s) {unused} fill no payload field; map them with payload.from_row "
                           "or list them in dataset.ignore_columns")
        return json_format.ParseDict({self.fills[c]: v for c, v in row.items() if c in self.fills},
                                     self.payload_cls())
