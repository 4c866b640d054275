"""Actor processes named by run and role (``ray::f[job:run]``) instead of all ``ray::AgentActor``.

Ray titles an actor's process ``ray::<class name>`` (``ray::<class name>.<method>`` while a
call runs), so each pool gets a subclass whose name says which job, run and role it serves.
"""

from __future__ import annotations

from functools import cache


@cache  # one class per pool: Ray exports each class once
def titled(actor_class: type, role: str, run_label: str) -> type:
    """A subclass of ``actor_class`` that Ray (ps, logs, the dashboard) shows as ``role[run_label]``."""
    name = f"{role}[{run_label}]"
    return type(name, (actor_class,), {"__qualname__": name, "__module__": actor_class.__module__})
