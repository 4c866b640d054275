"""What keeps other users out of a run: an owner-only run directory, the run's credentials, and a
Ray that only this user can use.

- ``prepare_run_dir``: makes the run directory a private folder (0700) and refuses one that other
  users could write to. The caller sets umask 077 for the run (the driver and every ``matrix-hpc``
  command but ``image build`` do), so that the run, its Ray and its actors create owner-only files.
- ``service_secret(run_dir)``: the secret every gRPC service of the run requires; ``services_tls``:
  the run's self-signed certificate when its services are reached over a network (cluster runs).
- ``ray_token(run_dir)`` / ``ray_token_env(run_dir)``: Ray's token authentication for the run's
  cluster; the Slurm bootstrap puts ``ray_token_env`` in the environment of every ``ray start``.
- ``LocalRay``: the single-machine default: every Ray socket on loopback, token auth on (loopback is
  reachable by every user of the machine), session files in a fresh owner-only temporary folder, and
  every process of that Ray stopped with the process that started it (``matrix_hpc.fate``).

Both credentials live in ``<run_dir>/credentials/`` (0700, files 0600), created on first use and
kept for resumes; nothing prints, logs or passes them on a command line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from matrix_hpc import fate
from matrix_hpc._compat import RAY_LOCAL_ONLY_ENV, reload_ray_auth_config, set_ray_local_only
from matrix_hpc.rundir import RunDir
from matrix_hpc.services.auth import CredentialError, TLSPair, private_folder, secret_file, tls_pair
from matrix_hpc.services.core.listen import CLUSTER_ENV

log = logging.getLogger(__name__)

SERVICE_SECRET_FILE = "service.secret"
RAY_TOKEN_FILE = "ray.token"
_RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
RUN_TMP_VAR = "MATRIX_HPC_RUN_TMP"  # the local Ray's private temporary folder, for the run's own temporary files
# Ray's Prometheus exporters answer plain HTTP without any credential (actor, node and session names,
# addresses, PIDs), on every interface of a cluster node: the dashboard agent's on each node, the
# dashboard's and the autoscaler's at fixed ports (44227, 44217). The run uses none of them. The
# first variable makes the raylet start its agent with ``--disable-metrics-collection``; the other
# two have no off switch, so they get a port no socket can bind, and Ray logs the failed start and
# goes on without them.
RAY_METRICS_OFF = {"RAY_enable_metrics_collection": "0", "DASHBOARD_METRIC_PORT": "65536",
                   "AUTOSCALER_METRIC_PORT": "65536"}


class RunDirRefused(Exception):
    """The run directory (or the folder holding it) can be written by other users, or is not ours."""


def _writable_by_others(st: os.stat_result) -> bool:
    return bool(st.st_mode & 0o022)


def prepare_run_dir(run_dir: str | Path) -> Path:
    """Make ``run_dir`` a private folder of ours (0700).

    Refuses (RunDirRefused) a run directory owned by someone else or writable by other users (group
    included), and one inside a folder that everyone can write to without the sticky bit (anyone could
    swap it; a group-writable project folder is a choice of its owners and is accepted). An existing
    run directory of ours that others can read (made by an older version) is closed to them (0700).
    """
    run_dir = Path(run_dir).absolute()
    parent = run_dir.parent
    while not parent.exists():
        parent = parent.parent
    pst = parent.stat()
    if pst.st_mode & stat.S_IWOTH and not pst.st_mode & stat.S_ISVTX:
        raise RunDirRefused(f"{run_dir}: refusing a run directory inside {parent}, which every user can write "
                            f"to (mode {stat.S_IMODE(pst.st_mode):04o}); choose a folder of your own")
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = run_dir.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RunDirRefused(f"{run_dir}: the run directory is not a folder")
    if st.st_uid != os.geteuid():
        raise RunDirRefused(f"{run_dir}: the run directory belongs to uid {st.st_uid}, not to this user "
                            f"(uid {os.geteuid()}); choose a folder of your own")
    if _writable_by_others(st):
        raise RunDirRefused(f"{run_dir}: other users can write to the run directory "
                            f"(mode {stat.S_IMODE(st.st_mode):04o}); run `chmod 700 {run_dir}` or choose another")
    if st.st_mode & 0o077:
        log.warning("%s: the run directory was readable by other users (mode %04o); now 0700",
                    run_dir, stat.S_IMODE(st.st_mode))
        run_dir.chmod(0o700)
    return run_dir


def credentials_dir(run_dir: str | Path) -> Path:
    return private_folder(RunDir(run_dir).credentials)


def service_secret(run_dir: str | Path) -> str:
    """The secret the run's gRPC services require (created owner-only on first use)."""
    return secret_file(credentials_dir(run_dir) / SERVICE_SECRET_FILE)


def services_tls(run_dir: str | Path) -> TLSPair | None:
    """The run's certificate and key (``credentials/tls.crt``, ``tls.key``) when its services should
    speak TLS: on a cluster (``RAY_ADDRESS``, ``MATRIX_HPC_CLUSTER``), where calls cross the network, or
    with MATRIX_HPC_TLS=1; MATRIX_HPC_TLS=0 turns it off. A local run's services listen on Unix sockets
    in the owner-only run directory, without TLS."""
    wanted = os.environ.get("MATRIX_HPC_TLS")
    on_cluster = os.environ.get("RAY_ADDRESS") or os.environ.get(CLUSTER_ENV)
    if wanted == "0" or (wanted != "1" and not on_cluster):
        return None
    return tls_pair(credentials_dir(run_dir))


def ray_token_path(run_dir: str | Path) -> Path:
    path = credentials_dir(run_dir) / RAY_TOKEN_FILE
    secret_file(path)
    return path


def ray_token(run_dir: str | Path) -> str:
    """The run's Ray authentication token (created owner-only on first use)."""
    return secret_file(ray_token_path(run_dir))


def ray_token_env(run_dir: str | Path) -> dict[str, str]:
    """Environment for every Ray process of the run (``ray start`` on each node, the driver) that turns
    Ray's token authentication on with the run's token. It names the token file, never the token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_path(run_dir))}


def use_cluster_token(run_dir: str | Path) -> None:
    """Before connecting to an existing cluster (RAY_ADDRESS): authenticate with the run's token, unless
    the environment already says how (RAY_AUTH_MODE / RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)."""
    if any(os.environ.get(v) for v in _RAY_AUTH_VARS[:3]):
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
            log.warning("RAY_AUTH_MODE=disabled: this Ray cluster accepts anyone who can reach it")
        return
    os.environ.update(ray_token_env(run_dir))
    reload_ray_auth_config()


class LocalRay:
    """Start a single-machine Ray that only this user can use; ``stop()`` shuts it down and puts the
    process environment back as it was.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray swaps a loopback address for
    the machine's, and then GCS, raylet, workers and agents listen on every interface. Ray's own
    local-only mode (what it uses on macOS and Windows) keeps them all on 127.0.0.1; token auth keeps
    other users of this machine out of those loopback ports, the dashboard agent's job API included.

    Every process of this Ray shares the fate of the process that starts it (``matrix_hpc.fate``): a
    watchdog stops them all when it dies, and the next start in the same run directory clears what a
    start killed together with its watchdog left (``local-ray.json`` names it: only our own).
    """

    def __init__(self, run_dir: str | Path, **init_kwargs):
        self.run_dir = Path(run_dir)
        self.init_kwargs = init_kwargs
        self.saved_env: dict[str, str | None] = {}
        self.temp_dir: Path | None = None
        self.watchdog: fate.Watchdog | None = None

    def start(self) -> None:
        import ray

        self._clear_leftovers()
        saved = (*_RAY_AUTH_VARS, fate.OWNER_VAR, RUN_TMP_VAR, *RAY_METRICS_OFF)
        self.saved_env = {k: os.environ.get(k) for k in saved}
        self.saved_local_only = set_ray_local_only(True)  # read by ray.init in this process; children read the env
        try:
            # Short (Unix socket paths are limited to 107 bytes), random and 0700, so nobody can plant or
            # read it. Ray makes its own temp folder 0777: that one goes one level down.
            self.temp_dir = Path(tempfile.mkdtemp(prefix="mhpc-ray-"))
            owner = fate.mark()
            self.watchdog = fate.Watchdog(owner, self.temp_dir)  # before the mark is in our environment
            self._record(owner)
            os.environ.pop("RAY_AUTH_TOKEN", None)
            os.environ.update({**ray_token_env(self.run_dir), RAY_LOCAL_ONLY_ENV: "0",
                               fate.OWNER_VAR: owner, RUN_TMP_VAR: str(self.temp_dir), **RAY_METRICS_OFF})
            reload_ray_auth_config()
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(self.temp_dir / "r"),
                     **self.init_kwargs)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> LocalRay:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.watchdog is not None:  # it stops what ray.shutdown left (Ray's agents) and removes temp_dir
            self.watchdog.close()
            self.watchdog = None
            self._record_path().unlink(missing_ok=True)
        set_ray_local_only(self.saved_local_only)
        for k, v in self.saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reload_ray_auth_config()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def _record_path(self) -> Path:
        return RunDir(self.run_dir).local_ray  # what a start made, for the next start to clear

    def _record(self, owner: str) -> None:
        self._record_path().write_text(json.dumps({"owner": owner, "temp_dir": str(self.temp_dir)}) + "\n")

    def _clear_leftovers(self) -> None:
        """What the last start in this run directory left when it was killed with its watchdog: its
        processes (by their mark, this user's only) and its temporary folder (if ours). Nothing while
        the process that made it still runs."""
        try:
            record = json.loads(self._record_path().read_text())
            owner, temp_dir = record["owner"], Path(record["temp_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if not fate.owner_has_exited(owner):
            return
        ours = temp_dir.name.startswith("mhpc-ray-") and temp_dir.is_dir() and temp_dir.stat().st_uid == os.geteuid()
        killed = fate.sweep(owner, temp_dir if ours else None)
        if killed:
            log.warning("stopped %d process(es) left by an earlier start of this run", killed)
        self._record_path().unlink(missing_ok=True)


__all__ = [
    "CredentialError", "LocalRay", "RAY_METRICS_OFF", "RunDirRefused", "prepare_run_dir", "ray_token", "ray_token_env",
    "service_secret", "services_tls", "use_cluster_token",
]
