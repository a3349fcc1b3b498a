#!/usr/bin/env bash
# A real Slurm cluster on one machine, posing as N nodes (Debian's slurmctld + slurmd + munge).
#
#   slurm/devcluster.sh up   [--dir DIR] [--nodes N] [--cpus C]   start it; prints the env to use
#   slurm/devcluster.sh down [--dir DIR]                          stop it (by the daemons' PIDs)
#   slurm/devcluster.sh status [--dir DIR]
#   eval "$(slurm/devcluster.sh env --dir DIR)"                   SLURM_CONF for sbatch & co.
#
# Everything lives under DIR (default /tmp/cascade-slurm): config, a private munge key and
# socket, spool, logs, pid files. Nodes are node1..nodeN at 127.0.1.I, each slurmd on its own port
# (an /etc/hosts line each, added once; needs root, as slurmd does). Partitions: `debug` (default,
# preemptable, requeued on preemption) and `urgent` (higher priority tier, preempts debug).
# Needs: apt-get install slurmctld slurmd slurm-client munge (`make slurm-deps`).
set -euo pipefail

cmd=${1:-}; shift || true
DIR=/tmp/cascade-slurm NODES=2 CPUS=2
while [ $# -gt 0 ]; do
  case $1 in
    --dir) DIR=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    *) echo "devcluster: unknown option $1" >&2; exit 2 ;;
  esac
done
DIR=$(mkdir -p "$DIR" && cd "$DIR" && pwd)
CONF=$DIR/etc/slurm.conf
BASE_PORT=$(( 17000 + ($(cksum <<<"$DIR" | cut -d' ' -f1) % 400) * 20 ))

pids() { cat "$DIR"/run/*.pid 2>/dev/null || true; }

# processes of this cluster: daemons and everything the jobs started (they carry SLURM_CONF=$CONF)
job_pids() {
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [ "$p" = $$ ] && continue
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_CONF=$CONF" && echo "$p"
  done
  return 0
}

down() {
  if [ -f "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    SLURM_CONF=$CONF scancel --quiet $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) 2>/dev/null || true
  fi
  for f in "$DIR"/run/slurmd-*.pid "$DIR"/run/slurmctld.pid "$DIR"/run/munged.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; fi
  done
  # job steps (slurmstepd and the tasks under it) can outlive their slurmd
  for p in $(job_pids); do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=0
    for pid in $(pids) $(job_pids); do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.1
  done
  for pid in $(pids) $(job_pids); do kill -9 "$pid" 2>/dev/null || true; done
  rm -f "$DIR"/run/*.pid
}

write_conf() {
  mkdir -p "$DIR"/etc "$DIR"/munge "$DIR"/spool/ctld "$DIR"/log "$DIR"/run
  local nodes="" i
  for i in $(seq 1 "$NODES"); do
    nodes+="NodeName=node$i NodeAddr=127.0.1.$i Port=$((BASE_PORT + i)) CPUs=$CPUS RealMemory=8000 State=UNKNOWN"$'\n'
  done
  cat > "$CONF" <<EOF
# written by slurm/devcluster.sh: $NODES nodes on one machine
ClusterName=cascade-dev
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$BASE_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munged.socket,cred_expire=10
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=30
MinJobAge=600
InactiveLimit=0
$nodes
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

up() {
  for tool in slurmctld slurmd munged sinfo; do
    command -v $tool >/dev/null || { echo "devcluster: $tool not found (make slurm-deps)" >&2; exit 1; }
  done
  down
  write_conf
  if [ ! -f "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 700 "$DIR/munge"; chmod 400 "$DIR/munge/munge.key"
  munged --force --socket="$DIR/munge/munged.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  for i in $(seq 1 "$NODES"); do
    grep -q "^127.0.1.$i node$i\$" /etc/hosts || echo "127.0.1.$i node$i" >> /etc/hosts
  done
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF" -i
  for i in $(seq 1 "$NODES"); do slurmd -f "$CONF" -N "node$i"; done
  for _ in $(seq 150); do
    idle=$(sinfo -h -N -p debug -t idle -o "%N" 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge "$NODES" ] && { echo "export SLURM_CONF=$CONF"; return 0; }
    sleep 0.2
  done
  echo "devcluster: nodes did not come up; logs in $DIR/log" >&2
  down
  exit 1
}

case $cmd in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status) SLURM_CONF=$CONF sinfo -N ;;
  *) sed -n '2,14p' "$0"; exit 2 ;;
esac
