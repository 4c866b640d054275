#!/bin/bash
# A local Slurm 22.05 "cluster" (2 fake-GPU nodes on loopback) + slurmdbd/MariaDB, as root, without systemd.
# For developing and testing `matrix-hpc submit`. Usage: SLURM_DIR=... slurm/local-slurm-up.sh; then export SLURM_CONF.
set -euo pipefail
D=${SLURM_DIR:-${TMPDIR:-/tmp}/matrix-hpc-slurm}; export SLURM_CONF=$D/slurm.conf
t0=$(date +%s.%N)
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd mariadb-server >/dev/null
fi
t1=$(date +%s.%N)
mkdir -p $D/state $D/log $D/fakegpu
for i in 0 1 2 3; do [ -e $D/fakegpu/nvidia$i ] || mknod $D/fakegpu/nvidia$i c 195 $i; done
cat > $D/slurm.conf <<CONF
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
NodeName=node[1-2] NodeAddr=127.0.0.1 NodeHostname=localhost Port=[17001-17002] CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=8000 Gres=gpu:fake:2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes=node[1-2] Default=NO MaxTime=INFINITE State=UP PriorityTier=10
CONF
cat > $D/gres.conf <<CONF
AutoDetect=off
NodeName=node1 Name=gpu Type=fake File=$D/fakegpu/nvidia[0-1]
NodeName=node2 Name=gpu Type=fake File=$D/fakegpu/nvidia[2-3]
CONF
cat > $D/slurmdbd.conf <<CONF
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
chmod 600 $D/slurmdbd.conf
# MariaDB via its sysv init script (no systemd here)
mysqladmin ping >/dev/null 2>&1 || /etc/init.d/mariadb start >/dev/null
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
t2=$(date +%s.%N)
slurmdbd
for i in $(seq 300); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.1; done
sacctmgr -n list cluster format=cluster | grep -qw local || sacctmgr -i add cluster local >/dev/null
t3=$(date +%s.%N)
slurmctld
slurmd -N node1
slurmd -N node2
for i in $(seq 300); do [ "$(sinfo -h -N -p debug -o %T 2>/dev/null | sort -u)" = idle ] && break; sleep 0.1; done
t4=$(date +%s.%N)
sinfo -N -o "%N %T %G"
printf 'timings: apt=%.1fs mariadb+conf=%.1fs slurmdbd=%.1fs ctld+slurmd=%.1fs total=%.1fs\n' $(echo "$t1-$t0;$t2-$t1;$t3-$t2;$t4-$t3;$t4-$t0" | bc)
echo "export SLURM_CONF=$SLURM_CONF"
