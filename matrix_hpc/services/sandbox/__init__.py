"""The sandbox service: run untrusted commands in locked-down, leak-free sandboxes over gRPC.

Runtimes: ``bwrap`` (bubblewrap over a debootstrapped root filesystem) and ``apptainer``.
Limits (wall clock, CPU, memory, processes, output, file size, work dir size) have safe defaults.

    ep = deploy("py", SandboxSpec(runtime="bwrap", image="python"), base_dir=job_dir)
    client = ep.client(key=task_id)
    r = await client.run(["python3", "main.py"], files={"main.py": code}, stdin="...")
    async with await client.open_session() as s:
        await s.exec("pip --version"); await s.put({"a.txt": "x"}); await s.get(["a.txt"])
    await ep.release([task_id]); ep.shutdown()
"""

from __future__ import annotations

from .client import RunResult, SandboxClient, Session
from .deploy import SandboxEndpoint, check_ready, deploy, describe_source
from .spec import Limits, SandboxSpec
from .wire import ServiceError

Endpoint = SandboxEndpoint

__all__ = [
    "Endpoint",
    "Limits",
    "RunResult",
    "SandboxClient",
    "SandboxEndpoint",
    "SandboxSpec",
    "ServiceError",
    "Session",
    "check_ready",
    "deploy",
    "describe_source",
]
