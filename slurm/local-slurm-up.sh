#!/bin/bash
# A local Slurm 22.05 "cluster" for trying and testing `matrix-hpc submit` without a cluster (root, no systemd):
# slurmctld, two slurmd "nodes" (node1 on 127.0.0.2, node2 on 127.0.0.3; 2 CPUs and 2 fake GPUs each),
# slurmdbd on MariaDB (so sacct works), a `debug` partition (default) and a `high` one whose jobs preempt
# debug jobs: the victim gets its --signal (USR2 from submitit) and is requeued.
# Idempotent: installs the Debian packages once, starts only what is not running (a few seconds).
# State under $SLURM_DIR (default $TMPDIR/matrix-hpc-slurm). Afterwards: export SLURM_CONF=$SLURM_DIR/slurm.conf
# Stop with slurm/local-slurm-down.sh (by pid).
set -euo pipefail
D=${SLURM_DIR:-${TMPDIR:-/tmp}/matrix-hpc-slurm}; export SLURM_CONF=$D/slurm.conf
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
t0=$(date +%s.%N)
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd mariadb-server >/dev/null
fi
mkdir -p "$D"/state "$D"/log "$D"/fakegpu
chmod 755 "$D"  # ordinary users read slurm.conf
for i in 0 1 2 3; do [ -e "$D/fakegpu/nvidia$i" ] || mknod "$D/fakegpu/nvidia$i" c 195 $i; done
cat > "$D/slurm.conf.new" <<CONF
ClusterName=local
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmctldPort=6817
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool-%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
GresTypes=gpu
NodeName=node1 NodeAddr=127.0.0.2 NodeHostname=localhost Port=17001 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=8000 Gres=gpu:fake:2 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.3 NodeHostname=localhost Port=17002 CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=8000 Gres=gpu:fake:2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=node[1-2] Default=NO MaxTime=INFINITE State=UP PriorityTier=10
CONF
mv "$D/slurm.conf.new" "$D/slurm.conf"
cat > "$D/gres.conf" <<CONF
AutoDetect=off
NodeName=node1 Name=gpu Type=fake File=$D/fakegpu/nvidia[0-1]
NodeName=node2 Name=gpu Type=fake File=$D/fakegpu/nvidia[2-3]
CONF
cat > "$D/slurmdbd.conf" <<CONF
AuthType=auth/none
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
CONF
chmod 600 "$D/slurmdbd.conf"
chmod 644 "$D/slurm.conf" "$D/gres.conf"
# MariaDB through its sysv init script (no systemd); remember that we started it, so that down stops it.
if ! mysqladmin ping >/dev/null 2>&1; then
  /etc/init.d/mariadb start >/dev/null && touch "$D/mariadb-started-here"
fi
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
if ! alive "$D/slurmdbd.pid"; then slurmdbd; fi
for _ in $(seq 300); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
sacctmgr -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null
alive "$D/slurmctld.pid" || slurmctld
alive "$D/slurmd-node1.pid" || slurmd -N node1
alive "$D/slurmd-node2.pid" || slurmd -N node2
for _ in $(seq 300); do
  [ "$(sinfo -h -N -p debug -o %T 2>/dev/null | sort -u | tr -d '\n')" = idle ] && break
  # a node left down/drained by an earlier stop comes back
  scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
  sleep 0.2
done
states=$(sinfo -h -N -p debug -o %T | sort -u | tr -d '\n')
case "$states" in idle|mixed|allocated) ;; *) echo "local slurm: nodes not up ($states); see $D/log" >&2; exit 1;; esac
printf 'local slurm up in %.1fs: ' "$(echo "$(date +%s.%N)-$t0" | bc)"; sinfo -h -N -p debug -o "%N %T %G" | tr '\n' ' '; echo
echo "export SLURM_CONF=$SLURM_CONF"
