import datetime

from google.protobuf import any_pb2 as _any_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATUS_UNSPECIFIED: _ClassVar[TaskStatus]
    TASK_STATUS_RUNNING: _ClassVar[TaskStatus]
    TASK_STATUS_DONE: _ClassVar[TaskStatus]
    TASK_STATUS_FAILED: _ClassVar[TaskStatus]
TASK_STATUS_UNSPECIFIED: TaskStatus
TASK_STATUS_RUNNING: TaskStatus
TASK_STATUS_DONE: TaskStatus
TASK_STATUS_FAILED: TaskStatus

class TaskError(_message.Message):
    __slots__ = ("role", "message", "traceback", "step", "attempts")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    message: str
    traceback: str
    step: int
    attempts: int
    def __init__(self, role: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ..., step: _Optional[int] = ..., attempts: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "row_index", "row_id", "trial", "step", "next_role", "status", "error", "attempt", "created", "updated", "payload", "seed", "trace", "retries", "service_waits")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_INDEX_FIELD_NUMBER: _ClassVar[int]
    ROW_ID_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROLE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    SERVICE_WAITS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    row_index: int
    row_id: str
    trial: int
    step: int
    next_role: str
    status: TaskStatus
    error: TaskError
    attempt: int
    created: _timestamp_pb2.Timestamp
    updated: _timestamp_pb2.Timestamp
    payload: _any_pb2.Any
    seed: int
    trace: _containers.RepeatedScalarFieldContainer[str]
    retries: int
    service_waits: int
    def __init__(self, task_id: _Optional[str] = ..., row_index: _Optional[int] = ..., row_id: _Optional[str] = ..., trial: _Optional[int] = ..., step: _Optional[int] = ..., next_role: _Optional[str] = ..., status: _Optional[_Union[TaskStatus, str]] = ..., error: _Optional[_Union[TaskError, _Mapping]] = ..., attempt: _Optional[int] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., payload: _Optional[_Union[_any_pb2.Any, _Mapping]] = ..., seed: _Optional[int] = ..., trace: _Optional[_Iterable[str]] = ..., retries: _Optional[int] = ..., service_waits: _Optional[int] = ...) -> None: ...
