"""The one retry policy: bounded attempts, backoff (every N failures), deadlines, a log line per retry."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from matrix_hpc.retry import backoff_s, retrying


class Flaky(Exception):
    pass


async def _call(policy, fail_times: int, calls: list[float]) -> str:
    async for attempt in policy:
        with attempt:
            calls.append(time.monotonic())
            if len(calls) <= fail_times:
                raise Flaky(f"failure {len(calls)}")
            return "ok"
    raise AssertionError("unreachable")


def test_retries_until_success_and_logs_each_retry(caplog):
    calls: list[float] = []
    with caplog.at_level(logging.INFO, logger="matrix_hpc.retry"):
        out = asyncio.run(_call(retrying(attempts=4, base_s=0.01, jitter=False, what="probe",
                                         retry_on=lambda e: isinstance(e, Flaky)), 2, calls))
    assert out == "ok" and len(calls) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["probe: attempt 1 of 4 failed (Flaky: failure 1); retrying in 0.01s",
                     "probe: attempt 2 of 4 failed (Flaky: failure 2); retrying in 0.02s"]


def test_the_last_error_is_raised_after_the_last_attempt():
    calls: list[float] = []
    with pytest.raises(Flaky, match="failure 3"):
        asyncio.run(_call(retrying(attempts=3, base_s=0.0, retry_on=lambda e: True), 10, calls))
    assert len(calls) == 3


def test_errors_that_are_not_retryable_are_raised_at_once():
    calls: list[float] = []
    with pytest.raises(Flaky, match="failure 1"):
        asyncio.run(_call(retrying(attempts=5, base_s=0.0, retry_on=lambda e: False), 10, calls))
    assert len(calls) == 1


def _waits(caplog) -> list[str]:
    return [r.getMessage().rsplit(" ", 1)[1] for r in caplog.records if r.name == "matrix_hpc.retry"]


def test_backoff_only_after_a_whole_round(caplog):
    calls: list[float] = []
    policy = retrying(attempts=7, every=3, base_s=0.05, jitter=False, retry_on=lambda e: True)
    with caplog.at_level(logging.INFO, logger="matrix_hpc.retry"), pytest.raises(Flaky):
        asyncio.run(_call(policy, 10, calls))
    assert len(calls) == 7
    assert _waits(caplog) == ["0.00s", "0.00s", "0.05s", "0.00s", "0.00s", "0.10s"]


def test_no_attempt_starts_after_the_deadline():
    calls: list[float] = []
    deadline = time.monotonic() + 0.3
    with pytest.raises(Flaky):
        asyncio.run(_call(retrying(attempts=100, base_s=0.1, cap_s=0.1, jitter=False, deadline=deadline,
                                   retry_on=lambda e: True), 1000, calls))
    # 0.1 s apart: the attempts at 0, 0.1, 0.2 and (the wait cut short) 0.3 s, then no more
    assert 2 <= len(calls) <= 5 and calls[-1] - calls[0] < 1.0


def test_backoff_doubles_up_to_the_cap():
    assert [backoff_s(n, base_s=0.5, cap_s=3.0, jitter=False) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    assert all(0.25 <= backoff_s(1, base_s=0.5) <= 0.75 for _ in range(50))


def test_the_same_policy_retries_blocking_code(caplog):
    from matrix_hpc.retry import retrying_sync

    calls = []
    caplog.set_level(logging.INFO, logger="matrix_hpc.retry")
    for attempt in retrying_sync(attempts=3, base_s=0, retry_on=lambda e: isinstance(e, OSError), what="start"):
        with attempt:
            calls.append(1)
            if len(calls) < 3:
                raise OSError(f"try {len(calls)}")
    assert len(calls) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "start: attempt 1 of 3 failed (OSError: try 1); retrying in 0.00s",
        "start: attempt 2 of 3 failed (OSError: try 2); retrying in 0.00s"]
    with pytest.raises(OSError, match="try 2"):
        for attempt in retrying_sync(attempts=2, base_s=0, retry_on=lambda e: True):
            with attempt:
                raise OSError(f"try {attempt.retry_state.attempt_number}")
