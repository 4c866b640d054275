#!/bin/bash
# Stop the daemons started by local-slurm-up.sh, by PID file only (never pkill).
D=${SLURM_DIR:-${TMPDIR:-/tmp}/matrix-hpc-slurm}
for f in $D/slurmd-node1.pid $D/slurmd-node2.pid $D/slurmctld.pid $D/slurmdbd.pid; do
  [ -f $f ] && pid=$(cat $f) && kill $pid 2>/dev/null && while [ -e /proc/$pid ]; do sleep 0.1; done
done
[ "${STOP_MARIADB:-1}" = 1 ] && [ -f /run/mysqld/mysqld.pid ] && kill $(cat /run/mysqld/mysqld.pid) 2>/dev/null; true
