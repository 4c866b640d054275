"""What an LLM service needs before it starts, checked in a second (before Ray and the engine):
its model folder is there and readable by this user. Each problem is one line that names the fix."""

from __future__ import annotations

import os
from pathlib import Path

from matrix_hpc.paths import (
    CacheUnreadable,
    StateDirError,
    check_cache_readable,
    describe_owner,
    first_unreadable,
    state_dir,
)
from matrix_hpc.services.llm.errors import ServiceError
from matrix_hpc.services.llm.spec import LLMSpec, resolve_model


def check_ready(spec: LLMSpec, base_dir: str | Path | None = None, *, local: bool = True) -> None:
    """Raise ServiceError (one line, with the fix) if the model cannot be loaded by this user (``local``
    changes nothing: the model folder is on the shared filesystem)."""
    if spec.backend != "vllm":
        return
    from matrix_hpc.services.llm.embedded import EMBEDDED

    embedded = spec.model in EMBEDDED
    if embedded:
        try:
            check_cache_readable()
        except CacheUnreadable as e:
            raise ServiceError(str(e)) from None
    try:
        folder = Path(resolve_model(spec.model, spec.backend, base_dir))
        bad = first_unreadable(folder)
    except PermissionError as e:
        folder = bad = Path(e.filename or spec.model)
    if bad is None:
        _check_state_dir()
        return
    fix = f"ask its owner to run `chmod -R a+rX {folder}`"
    if embedded:
        fix += " (or `make model` as the owner), or set MATRIX_HPC_CACHE to a cache of your own and run `make model`"
    raise ServiceError(f"model {spec.model!r}: {bad} is not readable by you ({describe_owner(bad)}): {fix}")


def _check_state_dir() -> None:
    """vLLM's per-user cache goes in the user's state folder (unless VLLM_CACHE_ROOT says where)."""
    if os.environ.get("VLLM_CACHE_ROOT"):
        return
    try:
        state_dir()
    except StateDirError as e:
        raise ServiceError(str(e)) from None
