"""Peer-to-peer routing: the actor that finished a step sends the message straight to an actor
of the next role. No broker sees every message.

Batching is automatic: at most one send is in flight per destination, and whatever finishes
while it is in flight leaves together in the next batch (one RPC per batch, not per message), up
to ``MAX_BATCH`` messages: a burst (a source letting 100,000 rows in) leaves in many batches, so a
checkpoint's pause, which waits for the send in flight and then queues behind the steps it started,
is never stuck behind one huge delivery.
The destination is picked by the power of two choices on the load each destination reported
with its last reply, plus what was sent to it since.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from matrix_hpc.job.spec import DONE
from matrix_hpc.retry import backoff_s

log = logging.getLogger(__name__)

# role -> actor names; the key "done" lists the sinks.
Directory = dict[str, list[str]]

_DEAD_BACKOFF_S = 1.0
_SEND_BACKOFF_S = 0.2
_SEND_BACKOFF_MAX_S = 5.0
SEND_RETRIES = 5
MAX_BATCH = 2048


class Router:
    def __init__(self, directory: Directory, large_payload_bytes: int,
                 on_undeliverable: Callable[[bytes, str, int], bytes] | None = None):
        self.directory = directory
        self.large = large_payload_bytes
        self._role_of = {name: role for role, names in directory.items() for name in names}
        self._handles: dict[str, ray.actor.ActorHandle] = {}
        self._load: dict[str, int] = dict.fromkeys(self._role_of, 0)
        self._dead_until: dict[str, float] = {}
        self._outbox: dict[str, list[bytes]] = {}
        self._sending: dict[str, asyncio.Task] = {}
        self._backing_off: set[str] = set()
        self._failures: dict[str, int] = {}  # destination -> sends failed in a row (not by a death)
        self.on_undeliverable = on_undeliverable  # (message, why, tries) -> the message as a failed task
        self._paused = False
        self.send_retries = 0
        self.sent_batches = 0
        self.sent_messages = 0

    def route(self, role: str, data: bytes) -> None:
        """Queue ``data`` for an actor of ``role``; sends start at once unless paused."""
        dest = self._pick(role)
        self._load[dest] += 1
        self._outbox.setdefault(dest, []).append(data)
        if dest not in self._sending and not self._paused:
            self._start_send(dest)

    def _pick(self, role: str) -> str:
        names = self.directory[role]
        if len(names) == 1:
            return names[0]
        now = time.monotonic()
        alive = [n for n in names if self._dead_until.get(n, 0) <= now] or names
        if len(alive) == 1:
            return alive[0]
        a, b = random.sample(alive, 2)
        return a if self._load[a] <= self._load[b] else b

    def _handle(self, name: str) -> ray.actor.ActorHandle:
        h = self._handles.get(name)
        if h is None:
            h = self._handles[name] = ray.get_actor(name)
        return h

    def _start_send(self, dest: str) -> None:
        queued = self._outbox.pop(dest)
        batch, rest = queued[:MAX_BATCH], queued[MAX_BATCH:]
        if rest:
            self._outbox[dest] = rest
        self._sending[dest] = asyncio.get_running_loop().create_task(self._send(dest, batch))

    async def _send(self, dest: str, batch: list[bytes]) -> None:
        try:
            items = [ray.put(b) if len(b) > self.large else b for b in batch]
            self._load[dest] = await self._handle(dest).deliver.remote(items)
        except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
            # The destination died: what it had not yet received goes to its peers instead.
            # (Whatever it had received is recovered by the driver from the last known state.)
            log.warning("actor %s unreachable (%s); re-routing %d message(s)", dest, type(e).__name__, len(batch))
            self._dead_until[dest] = time.monotonic() + _DEAD_BACKOFF_S
            self._handles.pop(dest, None)
            del self._sending[dest]
            for data in batch:
                self.route(self._role_of[dest], data)
            return
        except Exception as e:  # noqa: BLE001 - e.g. a full object store: keep the batch, try again later
            await self._send_failed(dest, batch, e)
            return
        self._failures.pop(dest, None)
        self.sent_batches += 1
        self.sent_messages += len(batch)
        del self._sending[dest]
        if dest in self._outbox and not self._paused:
            self._start_send(dest)

    async def _send_failed(self, dest: str, batch: list[bytes], error: Exception) -> None:
        """A send failed, not by a death: the batch goes back to the front of the outbox (so a
        checkpoint sees it) and is tried again after a backoff. After ``SEND_RETRIES`` failures to
        an agent the tasks fail with the error (and go to a sink); a sink is tried until it works."""
        failures = self._failures[dest] = self._failures.get(dest, 0) + 1
        self.send_retries += 1
        role = self._role_of[dest]
        if failures > SEND_RETRIES and role != DONE and self.on_undeliverable is not None:
            log.error("send of %d message(s) to %s failed %d times (%s); failing those tasks",
                      len(batch), dest, failures, error)
            self._failures.pop(dest, None)
            del self._sending[dest]
            why = f"could not be sent to role {role!r} after {failures} tries: {type(error).__name__}: {error}"
            for data in batch:
                self.route(DONE, self.on_undeliverable(data, why, failures))
            if dest in self._outbox and not self._paused:
                self._start_send(dest)
            return
        self._outbox[dest] = batch + self._outbox.get(dest, [])
        wait = backoff_s(failures, base_s=_SEND_BACKOFF_S, cap_s=_SEND_BACKOFF_MAX_S, jitter=False)
        log.warning("send of %d message(s) to %s failed (%s: %s); retry %d in %.1fs",
                    len(batch), dest, type(error).__name__, error, failures, wait)
        if self._paused:
            del self._sending[dest]
            return
        self._backing_off.add(dest)
        try:
            await asyncio.sleep(wait)  # cancelled by pause(): the batch is already back in the outbox
        finally:
            self._backing_off.discard(dest)
            del self._sending[dest]
        if dest in self._outbox and not self._paused:
            self._start_send(dest)

    async def pause(self) -> None:
        """Stop sending; return once no send is in flight (every message is on one side)."""
        self._paused = True
        for dest in list(self._backing_off):
            self._sending[dest].cancel()
        while self._sending:
            await asyncio.gather(*list(self._sending.values()), return_exceptions=True)

    def resume(self) -> None:
        self._paused = False
        for dest in list(self._outbox):
            if dest not in self._sending:
                self._start_send(dest)

    def pending(self) -> list[bytes]:
        """Messages queued but not sent (call while paused for a consistent view)."""
        return [data for batch in self._outbox.values() for data in batch]


async def resolve(items: list) -> list[bytes]:
    """Fetch messages that travelled by object reference (large payloads)."""
    refs = [(i, it) for i, it in enumerate(items) if isinstance(it, ray.ObjectRef)]
    if refs:
        values = await asyncio.gather(*(r for _, r in refs))
        items = list(items)
        for (i, _), v in zip(refs, values, strict=True):
            items[i] = v
    return items
