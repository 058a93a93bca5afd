#!/usr/bin/env bash
# Stop what up.sh started: cancel the jobs, then each daemon by its pid file (only when that pid
# still runs the expected program); remove the packages if up.sh installed them.
set -u
scancel --user="$(id -un)" 2>/dev/null || true
for daemon in slurmd:/run/slurmd.pid slurmctld:/run/slurmctld.pid munged:/run/munge/munged.pid; do
  name=${daemon%%:*}
  file=${daemon#*:}
  [ -s "$file" ] || continue
  pid=$(cat "$file")
  if [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$name" ]; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$file"  # the slurm user cannot remove its own pid files under /run
done
if [ -e /run/pgolf-slurm-installed ]; then
  DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq slurmctld slurmd slurm-client munge \
    >/dev/null 2>&1 || true
  rm -f /run/pgolf-slurm-installed
fi
