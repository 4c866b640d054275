#!/bin/bash
# Stop the daemons started by local-slurm-up.sh, by their pid files only (never pkill), and MariaDB if
# local-slurm-up.sh started it. Jobs still running are killed with their slurmd.
D=${SLURM_DIR:-${TMPDIR:-/tmp}/matrix-hpc-slurm}
stop() {
  [ -f "$1" ] || return 0
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 300); do [ -e "/proc/$pid" ] || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null; true
}
for f in slurmd-node1.pid slurmd-node2.pid slurmctld.pid slurmdbd.pid; do stop "$D/$f"; done
if [ -f "$D/mariadb-started-here" ]; then stop /run/mysqld/mysqld.pid; rm -f "$D/mariadb-started-here"; fi
true
