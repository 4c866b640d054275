"""The services a job can declare (``services:`` in the job file), by kind.

Each kind is a package exporting its spec model, ``deploy(name, spec, base_dir=...)`` and an
endpoint type; this registry is the one place that lists them, for the job loader (validation)
and the runtime (deployment) alike.
"""

from __future__ import annotations

import importlib
from types import ModuleType

KINDS = {"llm": ("matrix_hpc.services.llm", "LLMSpec"), "sandbox": ("matrix_hpc.services.sandbox", "SandboxSpec")}


def service_package(kind: str) -> ModuleType:
    return importlib.import_module(KINDS[kind][0])


def spec_class(kind: str) -> type:
    """The pydantic model of one named entry of this kind."""
    return getattr(service_package(kind), KINDS[kind][1])
