"""The run store: durable results, in-flight snapshots, export and status of one run.

A run directory holds the job as submitted, the payload's descriptor set, a fingerprint, logs,
and ``store.zarr`` (a zarr v3 group). See docs/store.md for the layout and its guarantees.
"""

from __future__ import annotations

from matrix_hpc.store.export import export
from matrix_hpc.store.run_store import DONE, FAILED, ResultWriter, RunStore, StoreError

__all__ = ["DONE", "FAILED", "ResultWriter", "RunStore", "StoreError", "export"]
