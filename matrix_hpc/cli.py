"""``matrix-hpc``: one command, one sub-command per concern.

Each concern owns its sub-commands in its own ``cli.py`` (a ``register`` function adding
parsers with ``func=`` handlers returning an exit code); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

# (module, function): each adds its sub-commands to the parser it is given.
_TOP_LEVEL = [
    ("matrix_hpc.runtime.cli", "register"),  # run
    ("matrix_hpc.runtime.rerun", "register"),  # rerun
    ("matrix_hpc.store.cli", "register"),  # export
    ("matrix_hpc.services.sandbox.cli", "register_image"),  # image build
    ("matrix_hpc.slurm.cli", "register"),  # submit, sbatch-script, cancel, logs; resume and status (local or Slurm)
]
_SERVE = [
    ("matrix_hpc.services.llm.cli", "register_serve"),  # serve llm
    ("matrix_hpc.services.sandbox.cli", "register_serve"),  # serve sandbox
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="matrix-hpc",
        description="Generate synthetic data with many cooperating LLM agents, "
        "on a laptop (local Ray) or a Slurm GPU cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module, func in _TOP_LEVEL:
        getattr(importlib.import_module(module), func)(sub)
    serve = sub.add_parser("serve", help="run one service (llm, sandbox) as a standalone gRPC server")
    serve_sub = serve.add_subparsers(dest="service", metavar="SERVICE", required=True)
    for module, func in _SERVE:
        getattr(importlib.import_module(module), func)(serve_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "image":
        # Whatever matrix-hpc writes (run directories, exports, secrets, logs) is the user's alone.
        # Images are read by the sandbox's own unprivileged user: `image build` keeps the umask.
        os.umask(0o077)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `matrix-hpc status RUN | head`: the reader left; nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # outside a run (which handles its own): no traceback
        print(f"matrix-hpc {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        # a path the user gave (an export target, a run directory ...): the path and why, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"matrix-hpc {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
