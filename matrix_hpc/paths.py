"""Where matrix-hpc keeps things that are built once and reused (models, images)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """``$MATRIX_HPC_CACHE``, else ``.cache`` in a source checkout, else ``~/.cache/matrix-hpc``."""
    env = os.environ.get("MATRIX_HPC_CACHE")
    if env:
        return Path(env)
    if (REPO_ROOT / "pyproject.toml").exists():
        return REPO_ROOT / ".cache"
    return Path.home() / ".cache" / "matrix-hpc"
