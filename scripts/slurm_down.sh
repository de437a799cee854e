#!/usr/bin/env bash
# Stop what scripts/slurm_up.sh started, by recorded PID only: cancel the jobs left, then
# slurmd, slurmctld and munged (TERM, then KILL after 10 s). Usage: bash scripts/slurm_down.sh
BASE=${SLURM_BASE:-/tmp/slurm}
ctld="$BASE/pids/slurmctld.pid"
if [ -s "$ctld" ] && kill -0 "$(cat "$ctld")" 2>/dev/null; then
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null
  sleep 1
fi
status=0
for d in slurmd slurmctld munged; do
  f="$BASE/pids/$d.pid"
  [ -s "$f" ] || continue
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "slurm_down: $d ($pid) still running" >&2; status=1; }
  fi
  rm -f "$f"
  echo "slurm_down: stopped $d ($pid)"
done
exit $status
