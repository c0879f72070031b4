#!/usr/bin/env bash
# A real Slurm cluster on this machine, for the tests: munged, slurmctld and two slurmd (nodes n1
# and n2, one CPU each) with their config, state, sockets and logs under DIR. Installs Debian's
# packages when they are missing (needs root). `stop` ends exactly the daemons `start` began
# (by their pid files under DIR), nothing else.
#
#   slurm-cluster.sh start DIR   prints SLURM_CONF=DIR/slurm.conf once both nodes are idle
#   slurm-cluster.sh stop DIR
set -euo pipefail

action=${1:?usage: slurm-cluster.sh start|stop DIR}
dir=${2:?usage: slurm-cluster.sh start|stop DIR}
dir=$(realpath -m "$dir")

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "slurm-cluster: Slurm is not installed, and installing it needs root" >&2
    exit 3
  fi
  echo "slurm-cluster: installing slurm-wlm and munge from Debian" >&2
  # Package scripts must not start the system's own daemons (ours run from DIR).
  ours=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    ours=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge >/dev/null
  if [ -n "$ours" ]; then rm -f /usr/sbin/policy-rc.d; fi
}

stop() {
  for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid "$dir"/munge/munged.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    alive=0
    for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid "$dir"/munge/munged.pid; do
      [ -f "$pidfile" ] || continue
      pid=$(cat "$pidfile" 2>/dev/null || true)
      [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
    done
    [ $alive = 0 ] && return 0
    sleep 0.1
  done
  for pidfile in "$dir"/slurmd-n1.pid "$dir"/slurmd-n2.pid "$dir"/slurmctld.pid "$dir"/munge/munged.pid; do
    [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
}

start() {
  install_packages
  mkdir -p "$dir"/state "$dir"/spool "$dir"/munge
  # munged runs as the munge user and must reach its directory.
  chmod 755 "$dir"
  chown munge:munge "$dir"/munge
  chmod 700 "$dir"/munge
  head -c 1024 /dev/urandom > "$dir"/munge/munge.key
  chown munge:munge "$dir"/munge/munge.key
  chmod 400 "$dir"/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --force \
    --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  # Slurm clients (root) must reach the socket.
  chmod 755 "$dir"/munge

  host=$(hostname -s)
  base=$((20000 + RANDOM % 20000))
  cat > "$dir"/slurm.conf <<CONF
ClusterName=ferrotune-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$base
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
PropagateResourceLimits=NONE
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((base + 1)) CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((base + 2)) CPUs=1 State=UNKNOWN
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$dir"/slurm.conf
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N n1
  slurmd -f "$SLURM_CONF" -N n2
  for _ in $(seq 300); do
    states=$(sinfo --noheader --format=%T 2>/dev/null | sort -u | tr '\n' ' ')
    if [ "$states" = "idle " ]; then
      echo "SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.1
  done
  echo "slurm-cluster: nodes not idle after 30 s (sinfo: ${states:-nothing}); logs in $dir" >&2
  tail -n 5 "$dir"/slurmctld.log "$dir"/slurmd-n1.log >&2 || true
  stop
  exit 1
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm-cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
