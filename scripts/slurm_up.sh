#!/usr/bin/env bash
# Bring up a real single-node Slurm on localhost for tests/test_slurm.py (Debian, root, no
# systemd): munged, slurmctld and slurmd, no slurmdbd (the Slurm profile checks job status with
# squeue; MinJobAge=3600 keeps finished jobs visible to it for the whole test run).
# Every daemon started is recorded as $SLURM_BASE/pids/<daemon>.pid; scripts/slurm_down.sh stops
# exactly those, by PID. Usage: bash scripts/slurm_up.sh   (SLURM_BASE defaults to /tmp/slurm)
set -euo pipefail
BASE=${SLURM_BASE:-/tmp/slurm}
HOST=$(hostname -s)
# Every CPU this machine gives us: nproc alone honours OMP_NUM_THREADS, which torchrun sets to 1
# in its own process (and so in a test process that ran it): a node of 1 CPU leaves every job
# of 2 ranks pending for ever (Reason=PartitionConfig).
NCPU=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)

for f in "$BASE"/pids/*.pid; do
  [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && {
    echo "slurm_up: $(basename "$f" .pid) from an earlier slurm_up is still running (pid $(cat "$f")); run scripts/slurm_down.sh first" >&2
    exit 1
  }
done

# The configuration this script writes (Slurm's default path; SLURM_UP_CONF only for its tests).
# One that another hand wrote (a real cluster's) is never overwritten.
CONF=${SLURM_UP_CONF:-/etc/slurm/slurm.conf}
MARK="# Written by dcp-matrix scripts/slurm_up.sh"
if [ -e "$CONF" ] && ! grep -qxF "${MARK}: single-node test cluster, no accounting." "$CONF"; then
  echo "slurm_up: $CONF exists and was not written by this script; not overwriting it" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
  || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
fi

mkdir -p "$BASE"/{state,spool,log,pids}
rm -f "$BASE"/pids/*.pid

# --- munge (authentication) -------------------------------------------------------------------
if ! munge -n </dev/null >/dev/null 2>&1; then
  [ -s /etc/munge/munge.key ] || {
    mungekey --create --force
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  }
  install -d -o munge -g munge -m 0755 /run/munge
  # setpriv execs munged itself, so $! is munged's PID (runuser would leave a parent behind).
  setpriv --reuid=munge --regid=munge --clear-groups /usr/sbin/munged --foreground \
    >"$BASE/log/munged.out" 2>&1 &
  echo $! >"$BASE/pids/munged.pid"
  for _ in $(seq 100); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null >/dev/null || { echo "slurm_up: munged did not start" >&2; exit 1; }
fi

# --- slurm.conf: one node, this host, all its CPUs ----------------------------------------------
mkdir -p "$(dirname "$CONF")"
cat >"$CONF" <<CONF
${MARK}: single-node test cluster, no accounting.
ClusterName=localcluster
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
SlurmctldPidFile=$BASE/slurmctld.pid
SlurmdPidFile=$BASE/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue for 5 min: the plugin's squeue status mode needs that.
MinJobAge=3600
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${NCPU} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF

# --- slurmctld + slurmd ---------------------------------------------------------------------------
/usr/sbin/slurmctld -D -i >"$BASE/log/slurmctld.out" 2>&1 &
echo $! >"$BASE/pids/slurmctld.pid"
for _ in $(seq 150); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
/usr/sbin/slurmd -D >"$BASE/log/slurmd.out" 2>&1 &
echo $! >"$BASE/pids/slurmd.pid"
for _ in $(seq 300); do [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && break; sleep 0.1; done
if [ "$(sinfo -h -o %t 2>/dev/null)" != idle ]; then
  echo "slurm_up: the node did not become idle; logs in $BASE/log" >&2
  sinfo >&2 || true
  exit 1
fi
sinfo
echo "slurm_up: ready (pids in $BASE/pids)"
