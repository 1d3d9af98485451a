#!/usr/bin/env bash
# A real one-host Slurm cluster for the tests (issue 14): munge + slurmctld + slurmd from Debian's slurm-wlm, with
# every file in one temporary folder and ports of its own, so nothing of the machine's Slurm (if any) is touched.
#
#   eval "$(cluster/slurm/local-cluster.sh up DIR)"   # starts the daemons; prints `export SLURM_CONF=DIR/slurm.conf`
#   cluster/slurm/local-cluster.sh down DIR           # stops them (also on a failed `up`)
#   cluster/slurm/local-cluster.sh check              # exit 0 when this machine can run it (root, packages), else why
#
# Needs root (slurmd runs jobs as any user; munged reads its key as root here, with --force).
set -uo pipefail

check() {
    [[ "$(id -u)" == 0 ]] || { echo "needs root (slurmd and munged run as root here)"; return 1; }
    for b in slurmctld slurmd sbatch munged mungekey; do
        command -v "$b" >/dev/null || { echo "$b missing: apt-get install slurm-wlm munge (scripts/setup.sh does)"; return 1; }
    done
    return 0
}

up() {
    local dir="$1" host ports
    check >&2 || return 1
    mkdir -p "$dir"/{state,spool,munge,log}
    host=$(hostname -s)
    # Ports: 6900 + a per-folder offset (tests run one cluster at a time; the machine's Slurm uses 6817/6818).
    ports=$((6900 + $(cksum <<<"$dir" | cut -d' ' -f1) % 50 * 2))
    # munge: a key of our own and a socket in the folder.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" \
        </dev/null >/dev/null 2>&1 || { echo "munged failed: $(tail -3 "$dir/log/munged.log")" >&2; return 1; }
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    cat > "$dir/slurm.conf" <<EOF
ClusterName=loradist
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
SlurmctldPort=$ports
SlurmdPort=$((ports + 1))
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
InactiveLimit=0
MinJobAge=300
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    export SLURM_CONF="$dir/slurm.conf"
    # The daemons must not keep this script's stdout: a caller reading it to the end would wait for them forever.
    slurmctld -i </dev/null >/dev/null 2>&1 || { echo "slurmctld failed: $(tail -5 "$dir/log/slurmctld.log")" >&2; down "$dir"; return 1; }
    slurmd </dev/null >/dev/null 2>&1 || { echo "slurmd failed: $(tail -5 "$dir/log/slurmd.log")" >&2; down "$dir"; return 1; }
    for _ in $(seq 1 60); do
        sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && { echo "export SLURM_CONF=$dir/slurm.conf"; return 0; }
        sleep 0.5
    done
    echo "the node did not become idle: $(sinfo 2>&1 | tail -2); $(tail -5 "$dir/log/slurmd.log")" >&2
    down "$dir"
    return 1
}

down() {
    local dir="$1"
    for f in slurmd.pid slurmctld.pid munge/munged.pid; do
        [[ -f "$dir/$f" ]] && kill "$(cat "$dir/$f")" 2>/dev/null
    done
    sleep 1
    for f in slurmd.pid slurmctld.pid munge/munged.pid; do
        [[ -f "$dir/$f" ]] && kill -9 "$(cat "$dir/$f")" 2>/dev/null
    done
    return 0
}

case "${1:-}" in
    up) up "${2:?folder}" ;;
    down) down "${2:?folder}" ;;
    check) check ;;
    *) echo "usage: $0 up DIR | down DIR | check" >&2; exit 2 ;;
esac
