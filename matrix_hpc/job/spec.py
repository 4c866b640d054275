"""The job file schema (``jobs/<job>/job.yaml``).

Every model forbids unknown keys, so a typo is an error with its line, not a silent default.
Relative paths are resolved against the job file's folder by the loader.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

DONE = "done"  # the role that ends a task: the agent returning it sends the task to be committed

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_IMPORT_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_ref(value: str) -> str:
    if not _IMPORT_REF.match(value):
        raise ValueError(f"{value!r} is not 'module:name' (e.g. 'agents:teacher')")
    return value


class DatasetSpec(_Strict):
    path: str = Field(description="JSONL or Parquet file, relative to the job folder")
    id_field: str | None = Field(None, description="column holding a stable row id; the row index if unset")
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    trials: int = Field(1, ge=1, description="tasks per row (samples)")
    ignore_columns: list[str] = Field(
        default_factory=list,
        description="columns that fill no payload field, on purpose; any other column that fills none "
        "(not a field's name, not in payload.from_row, not the id_field) is an error at load")

    @field_validator("path")
    @classmethod
    def _format(cls, v: str) -> str:
        if not v.endswith((".jsonl", ".json", ".parquet")):
            raise ValueError(f"dataset {v!r} must be a .jsonl or .parquet file")
        return v


class PayloadSpec(_Strict):
    proto: list[str] = Field(description=".proto file(s) next to the job, defining the payload")
    type: str = Field(description="full name of the payload message, e.g. 'dialogue.Dialogue'")
    from_row: dict[str, str] | None = Field(
        None, description="payload field <- dataset column; if given, only these columns fill the payload "
        "(others must be the id_field or in dataset.ignore_columns); by default columns fill fields of the same name"
    )
    builder: str | None = Field(None, description="'module:function' (row dict, payload class) -> payload")

    @field_validator("proto", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("builder")
    @classmethod
    def _builder_ref(cls, v: str | None) -> str | None:
        return None if v is None else _check_ref(v)

    @model_validator(mode="after")
    def _one_way(self) -> PayloadSpec:
        if self.from_row is not None and self.builder is not None:
            raise ValueError("give either from_row or builder, not both")
        return self


class RetrySpec(_Strict):
    max_retries: int = Field(2, ge=0, description="extra tries of a step that raised")
    backoff_s: float = Field(0.5, ge=0, description="wait before the first retry; doubles each time")


class RoleSpec(_Strict):
    agent: str = Field(description="'module:function' or 'module:Class' in the job folder")
    replicas: int = Field(1, ge=1, description="actor instances of this role")
    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per actor (agents mostly wait on services)")
    num_gpus: float = Field(0.0, ge=0)
    concurrency: int = Field(64, ge=1, description="steps one actor runs at once")
    step_timeout_s: float | None = Field(
        600.0, gt=0, description="a step running longer fails (and is retried); null: no limit")
    retry: RetrySpec | None = Field(None, description="overrides run.retry for this role")

    @field_validator("agent")
    @classmethod
    def _agent_ref(cls, v: str) -> str:
        return _check_ref(v)


class RunSpec(_Strict):
    max_in_flight: int = Field(1000, ge=1, description="tasks between the source and a durable commit")
    output_dir: str = Field("runs/{job}", description="the run directory ({job} is the job name)")
    sinks: int = Field(1, ge=1, description="sink actors committing results")
    seed: int = 0
    retry: RetrySpec = Field(default_factory=RetrySpec)
    checkpoint_interval_s: float = Field(60.0, gt=0, description="snapshot in-flight tasks this often")
    commit_interval_s: float = Field(1.0, gt=0, description="a finished row is durable within about this")
    large_payload_bytes: int = Field(256 * 1024, ge=1024, description="larger messages go by object reference")
    max_failed_fraction: float = Field(
        0.0, ge=0, le=1, description="failed tasks tolerated (a fraction of all) before the exit status says failed")


class SlurmSpec(_Strict):
    """Where ``matrix-hpc submit`` runs the job; maps onto submitit's Slurm parameters."""

    nodes: int = Field(1, ge=1, description="nodes of the allocation (Ray head on the first, workers on the rest)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (--gpus-per-node)")
    cpus_per_node: int | None = Field(None, ge=1, description="CPUs per node (--cpus-per-task, one task a node)")
    mem_gb: float | None = Field(None, gt=0, description="memory per node in GB (--mem)")
    time_min: int = Field(60, ge=1, description="time limit in minutes (--time)")
    partition: str | None = Field(None, description="--partition")
    account: str | None = Field(None, description="--account")
    qos: str | None = Field(None, description="--qos")
    constraint: str | None = Field(None, description="--constraint")
    exclusive: bool = Field(False, description="--exclusive")
    signal_delay_s: int = Field(120, ge=10, description="USR2 this long before the time limit or a preemption")
    max_requeues: int = Field(10, ge=0, description="requeues on preemption or time limit before giving up")
    extra: dict[str, Any] = Field(default_factory=dict, description="other sbatch options, name -> value")


class JobSpec(_Strict):
    name: str
    description: str = ""
    dataset: DatasetSpec
    payload: PayloadSpec
    roles: dict[str, RoleSpec]
    first_role: str
    services: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=dict, description="kind (llm, sandbox) -> service name -> its settings"
    )
    run: RunSpec = Field(default_factory=RunSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="used by `matrix-hpc submit`")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_' and '-'")
        return v

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: dict[str, RoleSpec]) -> dict[str, RoleSpec]:
        if not v:
            raise ValueError("a job needs at least one role")
        for role in v:
            if not _NAME.match(role) or role == DONE:
                raise ValueError(f"{role!r} cannot be a role name")
        return v

    @field_validator("services")
    @classmethod
    def _service_kinds(cls, v: dict) -> dict:
        unknown = set(v) - {"llm", "sandbox"}
        if unknown:
            raise ValueError(f"unknown service kind(s) {sorted(unknown)}; known: llm, sandbox")
        return v

    @field_validator("first_role")
    @classmethod
    def _first_role_known(cls, v: str, info: ValidationInfo) -> str:
        roles = info.data.get("roles") or {}
        if roles and v not in roles:
            raise ValueError(f"{v!r} is not one of the roles: {', '.join(roles)}")
        return v
