#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurm-wlm and munge), to try
# `hydra/launcher=slurm` by hand: docs/development.md. Needs root; CI never runs it.
#   tests/cluster/start_slurm.sh          install (apt), configure, start munged, slurmctld, slurmd
#   tests/cluster/start_slurm.sh stop     stop the three daemons (and cancel every job)
# No accounting (AccountingStorageType=none, as on many small clusters): sacct fails.
set -euo pipefail
host=$(hostname -s)
conf=/etc/slurm/slurm.conf

if [ "${1:-start}" = stop ]; then
    scancel --user="$(id -un)" 2>/dev/null || true
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        rm -f "$pidfile"
    done
    echo "slurm and munge stopped"
    exit 0
fi

command -v slurmctld >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq slurm-wlm munge; }

# munge: the key the package made, its folders, the daemon as the munge user
mkdir -p /run/munge && chown munge:munge /run/munge
[ -s /etc/munge/munge.key ] || { mungekey --create --force && chown munge:munge /etc/munge/munge.key; }
pgrep -x munged >/dev/null || runuser -u munge -- munged
munge -n | unmunge >/dev/null

# slurm: one node with this machine's CPUs and memory; no cgroups (linuxproc, task/none)
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > "$conf" <<CONF
ClusterName=cvae
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=30
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
    sinfo -h -o %T 2>/dev/null | grep -qx idle && break
    sleep 1
done
sinfo
