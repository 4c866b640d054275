"""``SandboxSpec``: one named sandbox service of a job (``services: sandbox: NAME: {...}``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MiB = 1024 * 1024


class Limits(BaseModel):
    """Per-command limits. Safe defaults; a job may change them, a request may only lower them."""

    model_config = ConfigDict(extra="forbid")

    wall_time_s: float = Field(30.0, gt=0, description="wall clock; the whole process tree is killed past it")
    cpu_time_s: float = Field(30.0, gt=0, description="CPU seconds of the whole process tree")
    memory_bytes: int = Field(512 * MiB, gt=0, description="memory of the whole tree (cgroup) or per process")
    max_processes: int = Field(64, gt=0, description="processes + threads alive at once")
    max_output_bytes: int = Field(1 * MiB, gt=0, description="kept per stream; the rest is dropped")
    max_file_bytes: int = Field(64 * MiB, gt=0, description="largest file a process may write")
    work_dir_bytes: int = Field(256 * MiB, gt=0, description="size of /work (tmpfs size, session quota)")

    def lowered(self, other: Limits | dict | None) -> Limits:
        """These limits, lowered (never raised) by the non-zero fields of ``other``."""
        if other is None:
            return self
        data = other if isinstance(other, dict) else other.model_dump()
        out = self.model_dump()
        for k, v in data.items():
            if k in out and v:
                out[k] = min(out[k], type(out[k])(v))
        return Limits(**out)


class SandboxSpec(BaseModel):
    """One sandbox service: which runtime, which image, which limits, how much concurrency."""

    model_config = ConfigDict(extra="forbid")

    runtime: Literal["bwrap", "apptainer"] = "bwrap"
    image: str = Field("python", description="a built image name (matrix-hpc image build NAME), 'host' "
                       "(bwrap: the node's own /usr, read-only), or a path to a root filesystem directory "
                       "or a .sif (relative to the job folder)")
    host_fallback: bool = Field(True, description="bwrap: where the named image is not built, use 'host' "
                                "instead (false: the built image or nothing)")
    limits: Limits = Field(default_factory=Limits)
    network: bool = Field(False, description="allow network access (off: only a private loopback)")
    env: dict[str, str] = Field(default_factory=dict, description="environment of every command")
    max_concurrent: int = Field(0, ge=0, description="sandboxes running at once per node; 0: CPU count")
    max_queue: int = Field(64, ge=0, description="requests waiting per node; beyond: RESOURCE_EXHAUSTED")
    max_sessions: int = Field(256, gt=0, description="open sessions per node")
    session_ttl_s: float = Field(600.0, gt=0, description="idle sessions are reaped after this")
    nodes: int | None = Field(None, ge=1, description="replicas (one per node); None: every node")
    num_cpus: float = Field(0.0, ge=0, description="Ray CPUs reserved by each replica actor")
    bwrap: str = "bwrap"
    apptainer: str = "apptainer"
