#!/usr/bin/env bash
# A real one-node SLURM cluster for the profile test: munge, slurmctld and slurmd from Debian's
# packages, started by hand (no systemd), talking over 127.0.0.1, with FAKE_GPUS character devices
# declared as gres/gpu. No accounting daemon: the profile test runs snakemake with
# --slurm-status-command squeue, and finished jobs stay visible in `squeue -t all` for MinJobAge.
# Needs root and apt. Stop it with down.sh.
set -euo pipefail

FAKE_GPUS=${FAKE_GPUS:-2}
node=$(hostname -s)
started=$(date +%s)
say() { echo "[slurm up +$(($(date +%s) - started))s] $*"; }

# daemons of an earlier run (one killed before its down.sh) would hold the ports
bash "$(dirname "$0")/down.sh" >/dev/null 2>&1 || true

export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  # down.sh removes what was installed here: with SLURM's client tools on the PATH and no
  # controller, every later snakemake call waits ~10 s in the SLURM plugin's import
  touch /run/pgolf-slurm-installed
fi
say "packages present"

getent hosts "$node" >/dev/null || echo "127.0.0.1 $node" >>/etc/hosts

# munge: the key Debian's package made, or a new one
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 755 /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null
say "munged running"

# the node's hardware as slurmd sees it; 80% of memory for jobs
hw=$(slurmd -C | head -1)
field() { sed -E "s/.*[ ]$1=([0-9]+).*/\1/" <<<"$hw"; }
memory=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10))

gres_line=""
if [ "$FAKE_GPUS" -gt 0 ]; then
  # gres/gpu needs device files; give each fake GPU its own char device (major 240 is for
  # local/experimental use), never a copy of /dev/null
  for i in $(seq 0 $((FAKE_GPUS - 1))); do
    rm -f "/dev/pgolf-fakegpu$i"
    mknod -m 666 "/dev/pgolf-fakegpu$i" c 240 "$i"
  done
  printf 'AutoDetect=off\nNodeName=%s Name=gpu File=/dev/pgolf-fakegpu[0-%d]\n' \
    "$node" $((FAKE_GPUS - 1)) >/etc/slurm/gres.conf
  gres_line="Gres=gpu:$FAKE_GPUS"
fi

cat >/etc/slurm/slurm.conf <<EOF
ClusterName=pgolfci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=slurm
SlurmctldPort=6817
SlurmdPort=6818
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SwitchType=switch/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/lib/slurm/slurmd
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=600
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(field CPUs) Sockets=$(field SocketsPerBoard) CoresPerSocket=$(field CoresPerSocket) ThreadsPerCore=$(field ThreadsPerCore) RealMemory=$memory $gres_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# a fresh controller and node state each time: job ids start at 1, no stale DRAIN
rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/*
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
/usr/sbin/slurmctld
for _ in $(seq 100); do port_open 6817 && break; sleep 0.2; done
/usr/sbin/slurmd
for _ in $(seq 100); do [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && break; sleep 0.2; done
if [ "$(sinfo -h -o %t)" != idle ]; then
  sinfo -R
  tail -20 /var/log/slurm/slurmctld.log
  exit 1
fi
say "slurmctld and slurmd running, node $node idle with $FAKE_GPUS fake GPU(s)"
