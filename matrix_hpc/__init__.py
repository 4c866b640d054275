"""matrix-hpc: peer-to-peer multi-agent synthetic data generation.

A job author needs five names: ``Agent`` (base for stateful agents), ``Context`` (what a step
receives beside the payload), ``DONE`` (the role that ends a task), ``load_job`` and ``run``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matrix_hpc.job.spec import DONE

if TYPE_CHECKING:  # visible to type checkers; imported on first use (Ray is slow to import)
    from matrix_hpc.job.load import load_job
    from matrix_hpc.runtime.context import Agent, Context
    from matrix_hpc.runtime.driver import run

__all__ = ["DONE", "Agent", "Context", "load_job", "run"]


def __getattr__(name: str):
    # Lazy so that `matrix-hpc --help` and the services do not pay for importing Ray.
    if name in ("Agent", "Context"):
        from matrix_hpc.runtime import context

        return getattr(context, name)
    if name == "load_job":
        from matrix_hpc.job.load import load_job

        return load_job
    if name == "run":
        from matrix_hpc.runtime.driver import run

        return run
    raise AttributeError(name)
