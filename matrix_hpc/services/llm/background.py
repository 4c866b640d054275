"""Run an LLM server on a background event-loop thread of this process (tests, benchmarks, notebooks).

with BackgroundServer(LLMSpec(backend="scripted"), "llm") as srv:
    endpoint = srv.endpoint()
    asyncio.run(endpoint.client().chat("hi"))
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from matrix_hpc.services.auth import TLSPair
from matrix_hpc.services.llm.endpoint import LLMEndpoint
from matrix_hpc.services.llm.server import LLMServer, serve
from matrix_hpc.services.llm.spec import LLMSpec


class BackgroundServer:
    def __init__(
        self,
        spec: LLMSpec,
        name: str = "llm",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        base_dir: Path | str | None = None,
        start_timeout: float = 600.0,
        secret: str | None = None,
        tls: TLSPair | None = None,
    ):
        self.spec = spec
        self.secret = secret
        self.tls = tls
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"llm-server-{name}", daemon=True)
        self.thread.start()
        try:
            fut = asyncio.run_coroutine_threadsafe(
                serve(spec, name, host=host, port=port, base_dir=base_dir, secret=secret, tls=tls), self.loop
            )
            self.server: LLMServer = fut.result(start_timeout)
        except BaseException:
            self._stop_loop()
            raise
        self.address = self.server.address

    def endpoint(self, **spec_updates) -> LLMEndpoint:
        spec = self.spec.model_copy(update=spec_updates) if spec_updates else self.spec
        return LLMEndpoint.from_addresses([self.address], name=self.name, spec=spec, secret=self.secret,
                                         tls_cert=self.tls.cert if self.tls else None)

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the server's loop (e.g. to inspect or poke the server)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace=0.5), timeout=120)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
