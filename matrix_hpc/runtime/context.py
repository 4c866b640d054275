"""What a job author writes against: an agent, and the context each step receives.

An agent is ``async def agent(payload, ctx) -> str`` (or a sync function), or a subclass of
``Agent`` with ``setup()`` and ``step()`` for agents that hold state. It does one step on the
payload (mutating it in place) and returns the next role's name, or ``DONE``.
"""

from __future__ import annotations

import logging
import random
from typing import Any


class Agent:
    """Base for stateful agents: one instance per actor, ``setup()`` once, ``step()`` per message.

    The runtime finds agents by their ``step`` method (``matrix_hpc.job.agents.resolve_agent``).
    """

    def setup(self) -> None:
        """Load what the agent keeps between steps (a classifier, a tokenizer, ...)."""

    async def step(self, payload: Any, ctx: Context) -> str:
        raise NotImplementedError


class Context:
    """Everything a step may use beside the payload: the task's identity, a seeded RNG, a logger,
    and the job's services by name."""

    __slots__ = ("task_id", "row_index", "row_id", "trial", "step", "role", "seed", "_services", "_random", "_log")

    def __init__(self, task, role: str, services: dict[str, dict[str, Any]], logger: logging.Logger):
        self.task_id: str = task.task_id
        self.row_index: int = task.row_index
        self.row_id: str = task.row_id
        self.trial: int = task.trial
        self.step: int = task.step
        self.role = role
        self.seed: int = task.seed
        self._services = services
        self._random: random.Random | None = None
        self._log = logger

    @property
    def random(self) -> random.Random:
        """Seeded by the task and the step: a retried or resumed step draws the same numbers."""
        if self._random is None:
            self._random = random.Random(self.seed * 1_000_003 + self.step)
        return self._random

    @property
    def log(self) -> logging.LoggerAdapter:
        return logging.LoggerAdapter(self._log, {"task_id": self.task_id, "role": self.role})

    def llm(self, name: str):
        """Client of the LLM service ``name``; turns of this task stick to one replica."""
        return self._service("llm", name).client(self.task_id)

    def sandbox(self, name: str):
        """Client of the sandbox service ``name``; its sessions belong to this task."""
        return self._service("sandbox", name).client(self.task_id)

    def _service(self, kind: str, name: str):
        try:
            return self._services[kind][name]
        except KeyError:
            known = ", ".join(self._services.get(kind, {})) or "none"
            raise KeyError(f"no {kind} service named {name!r} in this job (declared: {known})") from None
