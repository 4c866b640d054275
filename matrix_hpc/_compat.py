"""Every use of another library's private names, in one place.

Ray, submitit and zarr have no public API for a few things matrix-hpc needs. Each such use is a
function here, with a line saying why no public API does it, and an entry in ``BORROWED``: a
check that the installed version still has the name with the shape we use.
``matrix_hpc/test_compat.py`` runs every check, so an upgrade that renames or changes one fails
there, naming the library, its version and the name, instead of breaking a run silently.

Outside this module, matrix-hpc imports no ``_private`` module and calls no ``_name`` of
these libraries.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class IncompatibleLibrary(RuntimeError):
    """The installed version of a library no longer has a private name matrix-hpc uses."""


def _changed(dist: str, name: str, what: str) -> IncompatibleLibrary:
    return IncompatibleLibrary(f"{dist} {metadata.version(dist)} changed {name} ({what}); matrix-hpc borrows it: "
                               f"update matrix_hpc/_compat.py for this version")


def _has_parameters(dist: str, name: str, fn: Any, params: tuple[str, ...]) -> None:
    try:
        have = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a compiled function without a signature: nothing more to check
        return
    if missing := [p for p in params if p not in have]:
        raise _changed(dist, name, f"no parameter {', '.join(missing)}")


# -- Ray ---------------------------------------------------------------------------------------
# Ray prints its workers' output and its error messages ("A worker died ...") on the driver's
# terminal through ray._private.worker; no public switch sends them to a file.

def ray_worker_module():
    """``ray._private.worker``: holds ``print_to_stdstream`` and ``global_worker_stdstream_dispatcher``
    (``handlers``, ``add_handler``, ``remove_handler``), which runtime/ray_output.py swaps for a run."""
    import ray._private.worker as worker

    return worker


def _check_ray_worker() -> None:
    worker = ray_worker_module()
    for name in ("print_to_stdstream", "global_worker_stdstream_dispatcher"):
        if not hasattr(worker, name):
            raise _changed("ray", f"ray._private.worker.{name}", "gone")
    _has_parameters("ray", "ray._private.worker.print_to_stdstream", worker.print_to_stdstream,
                    ("data", "ignore_prefix"))
    dispatcher = worker.global_worker_stdstream_dispatcher
    for name in ("handlers", "add_handler", "remove_handler"):
        if not hasattr(dispatcher, name):
            raise _changed("ray", f"ray._private.worker.global_worker_stdstream_dispatcher.{name}", "gone")


# Ray reads its RAY_AUTH_* settings (and the token) once per process and caches them; a process
# that changes them (connecting with the run's token, a local Ray with token auth) must make Ray
# read them again. No public API does.

def reload_ray_auth_config() -> None:
    """Make this process's Ray see the RAY_AUTH_* environment variables as they are now."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _check_ray_auth() -> None:
    import ray._raylet as raylet

    for name, attr in (("Config", "initialize"), ("AuthenticationTokenLoader", "instance")):
        if not hasattr(getattr(raylet, name, None), attr):
            raise _changed("ray", f"ray._raylet.{name}.{attr}", "gone")
    if not hasattr(raylet.AuthenticationTokenLoader.instance(), "reset_cache"):
        raise _changed("ray", "ray._raylet.AuthenticationTokenLoader.instance().reset_cache", "gone")


# A local Ray listening on 127.0.0.1 only is Ray's "local-only" mode (its default on macOS and
# Windows). The environment variable that asks for it is read once, when Ray is imported; ray.init
# in this process reads the constant.

RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def set_ray_local_only(local_only: bool) -> bool:
    """Make ``ray.init`` in this process start Ray in local-only mode (or not); return the previous
    setting, to put back. Child processes read ``RAY_LOCAL_ONLY_ENV`` (set it to "0" too)."""
    from ray._private import ray_constants

    previous = not ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = not local_only
    return previous


def _check_ray_local_only() -> None:
    from ray._private import ray_constants

    if not isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool):
        raise _changed("ray", "ray._private.ray_constants.ENABLE_RAY_CLUSTER", "not a bool any more")
    if getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", None) != RAY_LOCAL_ONLY_ENV:
        raise _changed("ray", "ray._private.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR", f"not {RAY_LOCAL_ONLY_ENV}")


# -- submitit ----------------------------------------------------------------------------------
# submitit writes the sbatch script only while submitting; `matrix-hpc sbatch-script` and
# `submit --dry-run` show it without submitting.
# Its USR2 handler (JobEnvironment's checkpoint-and-requeue, for Checkpointable callables) is not
# used: the entry (slurm/entry.py) installs its own because the standalone script runs the entry
# without submitit, `matrix-hpc cancel` sends the same USR2 meaning "stop, do not requeue", and
# the driver must finish its checkpoint in its own thread before anything requeues. That is
# plain ``signal.signal``, no private name. With it, submitit's requeue counter is never read:
# ``SUBMITIT_MAX_NUM_TIMEOUT`` (public ``max_num_timeout``) only keeps submitit from refusing a
# requeue our own ``slurm.max_requeues`` allows.

SUBMITIT_MAX_NUM_TIMEOUT = 10**6


def submitit_sbatch_text(executor) -> str:
    """The sbatch script a ``submitit.SlurmExecutor`` would submit (running its pickled job)."""
    return executor._make_submission_file_text(executor._submitit_command_str, uid="dry-run")


def sbatch_script(command: str, folder: Path, setup: list[str], **params: Any) -> str:
    """An sbatch script running ``command`` with submitit's rendering of ``params`` (the
    ``SlurmExecutor.update_parameters`` names)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=command, folder=folder, setup=setup, **params)


def _check_submitit() -> None:
    import submitit
    from submitit.slurm import slurm

    if not hasattr(slurm, "_make_sbatch_string"):
        raise _changed("submitit", "submitit.slurm.slurm._make_sbatch_string", "gone")
    _has_parameters("submitit", "submitit.slurm.slurm._make_sbatch_string", slurm._make_sbatch_string,
                    ("command", "folder", "setup", "signal_delay_s", "additional_parameters"))
    executor = submitit.SlurmExecutor
    if not hasattr(executor, "_make_submission_file_text"):
        raise _changed("submitit", "SlurmExecutor._make_submission_file_text", "gone")
    _has_parameters("submitit", "SlurmExecutor._make_submission_file_text", executor._make_submission_file_text,
                    ("command", "uid"))
    if not isinstance(inspect.getattr_static(executor, "_submitit_command_str", None), property):
        raise _changed("submitit", "SlurmExecutor._submitit_command_str", "not a property any more")
    _has_parameters("submitit", "SlurmExecutor", executor, ("folder", "max_num_timeout"))


# -- zarr --------------------------------------------------------------------------------------
# Writing many chunks concurrently needs zarr's own event loop (its arrays' async methods run on
# it); zarr exposes the loop only through zarr.core.sync.sync.

def zarr_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on zarr's event loop and return its result (from a thread with no loop running)."""
    from zarr.core.sync import sync

    return sync(coroutine)


def _check_zarr_sync() -> None:
    from zarr.core import sync as module

    if not callable(getattr(module, "sync", None)):
        raise _changed("zarr", "zarr.core.sync.sync", "gone")
    _has_parameters("zarr", "zarr.core.sync.sync", module.sync, ("coro",))


BORROWED: dict[str, Callable[[], None]] = {
    "ray._private.worker (print_to_stdstream, stdstream dispatcher)": _check_ray_worker,
    "ray._raylet (Config.initialize, AuthenticationTokenLoader)": _check_ray_auth,
    "ray._private.ray_constants.ENABLE_RAY_CLUSTER": _check_ray_local_only,
    "submitit (_make_sbatch_string, _make_submission_file_text, _submitit_command_str)": _check_submitit,
    "zarr.core.sync.sync": _check_zarr_sync,
}
"""What each borrowed name is -> a check raising IncompatibleLibrary if the installed version changed it."""
