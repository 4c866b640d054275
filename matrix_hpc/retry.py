"""One way to retry, for every place that does: service clients moving between replicas, and
agent steps. Exponential backoff (optionally jittered, capped, bounded by a deadline), a bound
on attempts, and a line in the log for every retry. Built on tenacity.

    async for attempt in retrying(attempts=3, base_s=0.05, retry_on=is_transient, what="LLM chat"):
        with attempt:
            return await call()

``retrying_sync`` is the same policy for blocking code (``for attempt in retrying_sync(...)``).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception

log = logging.getLogger("matrix_hpc.retry")


def backoff_s(failures: int, *, base_s: float, cap_s: float = float("inf"), jitter: bool = True) -> float:
    """The wait after ``failures`` failed attempts (1, 2, ...): base, 2 x base, 4 x base ... up to cap."""
    delay = min(cap_s, base_s * 2 ** (failures - 1))
    return delay * (0.5 + random.random()) if jitter else delay


def retrying(*, attempts: int, base_s: float, retry_on: Callable[[BaseException], bool], cap_s: float = 2.0,
             jitter: bool = True, deadline: float | None = None, every: int = 1, what: str = "call",
             logger: logging.Logger = log) -> AsyncRetrying:
    """Up to ``attempts`` tries of a block, retrying exceptions for which ``retry_on`` is true.

    ``every``: back off only after that many failures in a row (one round over ``every``
    replicas), trying the next one at once in between. ``deadline`` (``time.monotonic()``): no
    wait runs past it and no attempt starts after it. The last exception is re-raised as it is.
    """
    return AsyncRetrying(**_policy(attempts=attempts, base_s=base_s, retry_on=retry_on, cap_s=cap_s, jitter=jitter,
                                   deadline=deadline, every=every, what=what, logger=logger))


def retrying_sync(*, attempts: int, base_s: float, retry_on: Callable[[BaseException], bool], cap_s: float = 2.0,
                  jitter: bool = True, deadline: float | None = None, every: int = 1, what: str = "call",
                  logger: logging.Logger = log) -> Retrying:
    """``retrying`` for blocking code: ``for attempt in retrying_sync(...): with attempt: ...``."""
    return Retrying(**_policy(attempts=attempts, base_s=base_s, retry_on=retry_on, cap_s=cap_s, jitter=jitter,
                              deadline=deadline, every=every, what=what, logger=logger))


def _policy(*, attempts: int, base_s: float, retry_on: Callable[[BaseException], bool], cap_s: float, jitter: bool,
            deadline: float | None, every: int, what: str, logger: logging.Logger) -> dict:

    def wait(state: RetryCallState) -> float:
        failures = state.attempt_number
        if failures % every:
            return 0.0
        delay = backoff_s(failures // every, base_s=base_s, cap_s=cap_s, jitter=jitter)
        return delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))

    def stop(state: RetryCallState) -> bool:
        return state.attempt_number >= attempts or (deadline is not None and time.monotonic() >= deadline)

    def before_sleep(state: RetryCallState) -> None:
        e = state.outcome.exception() if state.outcome else None
        logger.info("%s: attempt %d of %d failed (%s: %s); retrying in %.2fs", what, state.attempt_number,
                    attempts, type(e).__name__, e, state.upcoming_sleep)

    return {"stop": stop, "wait": wait, "retry": retry_if_exception(retry_on), "before_sleep": before_sleep,
            "reraise": True}

