"""The runtime's side of the services: deploy and stop what a job declares.

The kinds that exist are listed in ``matrix_hpc.services``; agents see them through ``Context``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from matrix_hpc.services import service_package, spec_class
from matrix_hpc.services.auth import TLSPair

Endpoints = dict[str, dict[str, Any]]  # kind -> name -> endpoint


def deploy_all(services: dict[str, dict[str, dict]], base_dir: Path,
               on_deploy: Callable[[str, str, str], None] | None = None, *, secret: str | None = None,
               tls: TLSPair | None = None, socket_dir: Path | None = None) -> Endpoints:
    """Start every declared service (Ray actors) requiring ``secret`` on every call (over TLS with
    ``tls``; on one machine on Unix sockets in the owner-only ``socket_dir``); stop the ones already
    started if one fails.

    ``on_deploy(kind, name, source)`` is called as each one starts (the driver shows it as a phase);
    ``source`` says what it runs on where the kind can tell (a sandbox's image), else ""."""
    endpoints: Endpoints = {}
    try:
        for kind, entries in services.items():
            pkg = service_package(kind)
            for name, settings in (entries or {}).items():
                spec = spec_class(kind).model_validate(settings or {})
                if on_deploy:
                    describe = getattr(pkg, "describe_source", None)
                    on_deploy(kind, name, describe(spec, base_dir) if describe else "")
                endpoints.setdefault(kind, {})[name] = pkg.deploy(name, spec, base_dir=base_dir, secret=secret,
                                                                  tls=tls, socket_dir=socket_dir)
    except BaseException:
        shutdown_all(endpoints)
        raise
    return endpoints


def shutdown_all(endpoints: Endpoints) -> None:
    for by_name in endpoints.values():
        for endpoint in by_name.values():
            endpoint.shutdown()
