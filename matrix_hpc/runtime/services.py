"""The runtime's side of the services: validate, deploy and stop what a job declares.

Only this module knows which service kinds exist; agents see them through ``Context``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

_PACKAGES = {"llm": ("matrix_hpc.services.llm", "LLMSpec"), "sandbox": ("matrix_hpc.services.sandbox", "SandboxSpec")}

Endpoints = dict[str, dict[str, Any]]  # kind -> name -> endpoint


def _package(kind: str):
    return importlib.import_module(_PACKAGES[kind][0])


def spec_class(kind: str) -> type:
    return getattr(_package(kind), _PACKAGES[kind][1])


def deploy_all(services: dict[str, dict[str, dict]], base_dir: Path) -> Endpoints:
    """Start every declared service (Ray actors); stop the ones already started if one fails."""
    endpoints: Endpoints = {}
    try:
        for kind, entries in services.items():
            pkg = _package(kind)
            for name, settings in (entries or {}).items():
                spec = spec_class(kind).model_validate(settings or {})
                endpoints.setdefault(kind, {})[name] = pkg.deploy(name, spec, base_dir=base_dir)
    except BaseException:
        shutdown_all(endpoints)
        raise
    return endpoints


def shutdown_all(endpoints: Endpoints) -> None:
    for by_name in endpoints.values():
        for endpoint in by_name.values():
            endpoint.shutdown()
