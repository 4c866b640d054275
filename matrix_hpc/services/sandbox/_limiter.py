"""Tiny launcher run between the server and the runtime (bwrap / apptainer).

``python -I -S _limiter.py CONFIG_JSON ARGV...``: join the sandbox's cgroups, set resource
limits, start a new session (so the whole group can be killed), drop root to an unprivileged
uid, then exec ARGV. Kept free of imports from matrix_hpc so it starts in a few milliseconds.
"""

import json
import os
import resource
import sys
import warnings  # noqa: F401 - os.exec* imports it lazily; after setuid it may be unreadable


def main() -> None:
    cfg = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    pid = str(os.getpid())
    for procs in cfg.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write(pid)
    for name, value in cfg.get("rlimits", {}).items():
        soft, hard = value
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.setsid()
    uid = cfg.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(uid)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report and fail; the server maps 127 to an error
        sys.stderr.write(f"matrix-hpc sandbox launcher: {type(e).__name__}: {e}\n")
        os._exit(127)
