#!/bin/bash
# Stop the daemons started by local-slurm-up.sh, by their pid files only (never pkill), and MariaDB if
# local-slurm-up.sh started it. Jobs still running are killed with their slurmd.
D=${SLURM_DIR:-${TMPDIR:-/tmp}/matrix-hpc-slurm}
running() {  # a zombie has exited already (its /proc entry stays until its parent reaps it)
  local state; state=$(awk '{sub(/.*\) /, ""); print $1}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}
stop_pid() {
  local pid=$1
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 300); do running "$pid" || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null; true
}
stop() { [ -f "$1" ] && stop_pid "$(cat "$1")"; true; }
# MariaDB's init script runs mariadbd under mysqld_safe, a shell that restarts it and pipes its output
# into `logger`. Stopping mariadbd alone let mysqld_safe live on, holding its exited children as zombies:
# its own pid (mariadbd's parent) and its logger are noted first, then stopped after mariadbd (whose clean
# shutdown removes its pid file, so mysqld_safe does not restart it); their exited children go to init.
stop_mariadb() {
  local server wrapper helpers=""
  server=$(cat /run/mysqld/mysqld.pid 2>/dev/null)
  [ -n "$server" ] && wrapper=$(ps -o ppid= -p "$server" | tr -d ' ')
  if [ -n "$wrapper" ] && [ "$wrapper" != 1 ] && grep -qa mysqld_safe "/proc/$wrapper/cmdline" 2>/dev/null; then
    helpers=$(ps -o pid= --ppid "$wrapper" | tr -d ' ' | grep -vx "$server")
  else
    wrapper=""
  fi
  stop /run/mysqld/mysqld.pid
  for pid in $wrapper $helpers; do stop_pid "$pid"; done
}
for f in slurmd-node1.pid slurmd-node2.pid slurmctld.pid slurmdbd.pid; do stop "$D/$f"; done
if [ -f "$D/mariadb-started-here" ]; then stop_mariadb; rm -f "$D/mariadb-started-here"; fi
true
