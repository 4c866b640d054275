#!/bin/bash
# Run a command (the test suite) with the local Slurm up: start it if it is not running (as root),
# export SLURM_CONF, run the command, and stop the daemons afterwards if this script started them,
# whatever the command's outcome. Not root and no Slurm: the command runs without it (the Slurm tests skip).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
D=${SLURM_DIR:-${TMPDIR:-/tmp}/matrix-hpc-slurm}; export SLURM_DIR=$D
if [ "$(id -u)" != 0 ]; then exec "$@"; fi
was_up=0
[ -f "$D/slurmctld.pid" ] && kill -0 "$(cat "$D/slurmctld.pid")" 2>/dev/null && was_up=1
if [ $was_up = 0 ]; then trap 'bash "$HERE/local-slurm-down.sh"' EXIT; fi
bash "$HERE/local-slurm-up.sh" || exit 1
export SLURM_CONF=$D/slurm.conf
"$@"
