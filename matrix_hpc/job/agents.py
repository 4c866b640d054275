"""Agent references in a job file (``module:name``): importing them and checking their shape.

Used by the loader (to check every agent before a run starts) and by the runtime's actors (to
get the step callable); the ``Agent`` base class itself lives with ``Context`` in the runtime.
"""

from __future__ import annotations

import importlib
from typing import Any


def resolve_ref(ref: str) -> Any:
    """The object named by ``module:name`` (the module is imported from sys.path)."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def resolve_agent(ref: str, *, instantiate: bool = True):
    """Import ``module:name``; return a step callable ``(payload, ctx) -> str | awaitable``.

    A class (an ``Agent`` subclass, or any class with ``step``) is instantiated and its
    ``setup()`` called. With ``instantiate=False`` only check that it can be imported and has
    the right shape (the loader does this before a run; ``setup()`` runs in the actors).
    """
    obj = resolve_ref(ref)
    if isinstance(obj, type):
        if not callable(getattr(obj, "step", None)):
            raise TypeError(f"class {obj.__name__} has no step(payload, ctx) method")
        if not instantiate:
            return obj
        instance = obj()
        setup = getattr(instance, "setup", None)
        if setup:
            setup()
        return instance.step
    if not callable(obj):
        raise TypeError(f"{ref} is not a function or an Agent class")
    return obj
