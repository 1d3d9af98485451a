#!/usr/bin/env bash
# Local multi-host harness: N "hosts" (network namespaces) on one machine, joined by veth links to a
# bridge that lives in its own "switch" namespace, optionally shaped with tc (rate + delay), and
# Open MPI jobs started across them (mpirun's rsh launcher = this script's `agent`, which does
# `ip netns exec <host-ns> …`). Used by Tests/DistributedTests/NetnsHarnessTests.swift and by the
# all-reduce benchmark for rows over 1 / 10 Gbit/s links.
#
# Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN): `ip netns add` mounts under /run/netns.
#
# Usage
#   harness.sh up N [--rate 1gbit|10gbit|…] [--delay 0.5ms] [--slots S] [--owner PID]
#       Creates the switch namespace and N host namespaces; prints the instance id (one line) on stdout.
#       --rate   each host link is full duplex at this rate (tc tbf on both ends of the veth).
#       --delay  one-way latency between two hosts (tc netem delay on the host's egress only; RTT = 2×delay).
#                Needs the kernel's sch_netem; where it is missing, `up` fails saying so (tbf works without it).
#       --slots  Open MPI slots per host in the generated hostfile (default 1).
#       --owner  the PID whose lifetime the instance belongs to (default: the caller, $PPID). Instances
#                whose owner is dead are leftovers of killed runs and are removed by the next `up`/`prune`.
#   harness.sh run ID [mpirun options…] -- PROGRAM [ARGS…]
#       mpirun, started inside the switch namespace, with the hostfile of the hosts, ranks in the host
#       namespaces, and TCP-only transports restricted to the harness subnet. Without -np: N × slots ranks.
#       Each host namespace also has its own UTS namespace whose hostname is the host's name (h0, h1, …)
#       as a rank sees it, so `hostname` / MPI_Get_processor_name tell the "hosts" apart.
#   harness.sh stats ID        per-host byte counters of the link, seen from the switch side:
#                              "h0 rx_bytes tx_bytes" (rx = sent by the host, tx = delivered to it).
#   harness.sh exec ID HOST CMD…   run one command inside host namespace HOST (h0, h1, …).
#   harness.sh down ID         removes the instance: kills what still runs in its namespaces, deletes them
#                              (which deletes their veths and the bridge), removes the state folder. Idempotent.
#   harness.sh prune           removes every instance with this prefix whose owner PID is dead.
#   harness.sh with N [up options] -- COMMAND…
#       up, then COMMAND with HARNESS_ID and HARNESS (this script) in its environment, then down from an
#       EXIT trap (also on failure or Ctrl-C). The simplest form for a bench script:
#         cluster/netns/harness.sh with 3 --rate 10gbit --delay 0.5ms -- \
#           sh -c '"$HARNESS" run "$HARNESS_ID" -np 3 -- .build/release/some-bench --size 42600000'
#       A script that calls `up` itself must call `down` itself (trap 'harness.sh down "$id"' EXIT).
#
# Names and addresses. Instance id = ${LORA_NETNS_PREFIX:-ldnet}<owner-pid>; namespaces <id>-sw and
# <id>-h0 … <id>-h(N-1). Subnet 10.213.0.0/24: host i is 10.213.0.(i+1), the switch's bridge is
# 10.213.0.254 (mpirun's own address). All of it lives inside the instance's namespaces, so parallel
# instances never see each other and the root namespace gets no interface, address or route; only
# these addresses are ever targeted. Interface names: eth0 in a host, h<i> (port) and br0 in the switch.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
PREFIX="${LORA_NETNS_PREFIX:-ldnet}"
SUBNET="10.213.0.0/24"
NET3="10.213.0"
SWITCH_ADDR="$NET3.254"
STATE_ROOT="${LORA_NETNS_STATE:-/tmp/lora-netns}"

die() { echo "harness.sh: $*" >&2; exit 1; }

usage() { sed -n '2,/^set -euo/p' "$SELF" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }

need_root() {
    command -v ip >/dev/null || die "the 'ip' command (iproute2) is missing: apt-get install iproute2"
    # Probe the permission the harness needs rather than trusting the uid: containers can be root without it.
    local probe="${PREFIX}probe$$"
    if ! ip netns add "$probe" 2>/dev/null; then
        die "cannot create network namespaces ('ip netns add' refused): run as root or with CAP_NET_ADMIN and CAP_SYS_ADMIN"
    fi
    ip netns del "$probe" 2>/dev/null || true
}

instances() {  # ids with our prefix that have at least one namespace
    ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^\(${PREFIX}[0-9][0-9]*\)-\(sw\|h[0-9][0-9]*\)\$/\1/p" | sort -u
}

namespaces_of() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$1-(sw|h[0-9]+)\$" || true; }

do_down() {
    local id="$1" ns pid
    [[ "$id" =~ ^${PREFIX}[0-9]+$ ]] || die "'$id' is not an instance id of this harness (expected ${PREFIX}<pid>)"
    for ns in $(namespaces_of "$id"); do
        # Processes the harness started in the namespace (orted, ranks) would keep it alive after
        # `ip netns del` unmounts its name; end them by id.
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$pid" 2>/dev/null || true; done
    done
    for ns in $(namespaces_of "$id"); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "${STATE_ROOT:?}/$id"
    [[ -z "$(namespaces_of "$id")" ]] || die "namespaces of $id survived deletion: $(namespaces_of "$id" | tr '\n' ' ')"
}

do_prune() {
    local id owner
    for id in $(instances); do
        owner="${id#"$PREFIX"}"
        if ! kill -0 "$owner" 2>/dev/null; then
            echo "harness.sh: removing leftover instance $id (owner $owner is gone)" >&2
            do_down "$id"
        fi
    done
    # State folders without namespaces (a run killed between creating the folder and the namespaces).
    if [[ -d "$STATE_ROOT" ]]; then
        for d in "$STATE_ROOT"/"$PREFIX"*; do
            [[ -d "$d" ]] || continue
            id="$(basename "$d")"; owner="${id#"$PREFIX"}"
            kill -0 "$owner" 2>/dev/null || rm -rf "$d"
        done
    fi
}

rate_bits() {  # tc rate → bits per second ("1gbit" → 1000000000, "125mbps" → 1000000000)
    awk -v r="$1" 'BEGIN {
        if (!match(r, /^[0-9.]+/)) exit 1
        v = substr(r, 1, RLENGTH); u = substr(r, RLENGTH + 1)
        m["bit"] = 1; m["kbit"] = 1e3; m["mbit"] = 1e6; m["gbit"] = 1e9; m["tbit"] = 1e12
        m["bps"] = 8; m["kbps"] = 8e3; m["mbps"] = 8e6; m["gbps"] = 8e9; m["tbps"] = 8e12
        if (!(u in m) || v + 0 <= 0) exit 1
        printf "%.0f\n", v * m[u] }'
}

shape() {  # shape NS DEV RATE DELAY — DEV's egress; no-op when neither is set
    local ns="$1" dev="$2" rate="$3" delay="$4" parent="root"
    [[ -n "$rate" || -n "$delay" ]] || return 0
    if [[ -n "$rate" ]]; then
        # tbf: the bucket must hold the largest packet (veth hands over 64 KiB GSO segments) and a few
        # timer ticks of traffic (HZ may be 250: 4 ms), else the link runs below its rate.
        local bits burst
        bits="$(rate_bits "$rate")"
        burst=$((bits / 8 / 250)); ((burst < 262144)) && burst=262144
        tc -n "$ns" qdisc replace dev "$dev" root handle 1: tbf rate "$rate" burst "$burst" latency 50ms \
            || die "tc tbf on $dev in $ns failed (rate '$rate')"
        parent="parent 1:1"
    fi
    if [[ -n "$delay" ]]; then
        # limit: netem's default queue of 1000 packets overflows at 10 Gbit/s × a delay with 64 KiB
        # segments; drops would measure TCP recovery, not the link.
        # shellcheck disable=SC2086
        tc -n "$ns" qdisc replace dev "$dev" $parent handle 10: netem delay "$delay" limit 100000 2>/dev/null \
            || die "--delay needs the kernel's sch_netem qdisc, which this kernel lacks ('tc qdisc add … netem' answers: unknown qdisc kind); use --rate alone (tbf) or a kernel with CONFIG_NET_SCH_NETEM"
    fi
}

do_up() {
    local n="" rate="" delay="" slots=1 owner="$PPID"
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --rate) rate="${2:-}"; shift 2 ;;
            --delay) delay="${2:-}"; shift 2 ;;
            --slots) slots="${2:-}"; shift 2 ;;
            --owner) owner="${2:-}"; shift 2 ;;
            -*) die "up: unknown option '$1' (options: --rate, --delay, --slots, --owner)" ;;
            *) [[ -z "$n" ]] || die "up: one host count expected, got '$n' and '$1'"; n="$1"; shift ;;
        esac
    done
    [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 200 ]] || die "up: host count must be 1…200, got '${n:-nothing}'"
    [[ "$slots" =~ ^[0-9]+$ && "$slots" -ge 1 ]] || die "up: --slots must be a positive integer, got '$slots'"
    [[ -z "$rate" ]] || rate_bits "$rate" >/dev/null \
        || die "up: --rate '$rate' is not a tc rate (examples: 1gbit, 10gbit, 500mbit)"
    [[ -z "$delay" || "$delay" =~ ^[0-9.]+(us|ms|s)$ ]] || die "up: --delay '$delay' is not a tc time (examples: 0.5ms, 100us)"
    [[ "$owner" =~ ^[0-9]+$ ]] && kill -0 "$owner" 2>/dev/null || die "up: --owner '$owner' is not a running process"
    need_root
    do_prune

    local id="${PREFIX}${owner}"
    [[ -z "$(namespaces_of "$id")" ]] || die "up: instance $id is already up (one per owner process); call 'harness.sh down $id' first"
    local state="$STATE_ROOT/$id" sw="$id-sw" i ns
    mkdir -p "$state"
    # From here on a failure (including die) must not leave half an instance behind.
    local done_up=0
    trap '[[ $done_up == 1 ]] || do_down "'"$id"'" >/dev/null 2>&1 || true' EXIT
    ip netns add "$sw"
    ip -n "$sw" link set lo up
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" addr add "$SWITCH_ADDR/24" dev br0
    ip -n "$sw" link set br0 up
    : >"$state/hostfile"
    for ((i = 0; i < n; i++)); do
        ns="$id-h$i"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$sw" link add "h$i" type veth peer name eth0 netns "$ns"
        ip -n "$sw" link set "h$i" master br0 up
        ip -n "$ns" addr add "$NET3.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
        shape "$ns" eth0 "$rate" "$delay"   # host → switch: rate and the one-way delay
        shape "$sw" "h$i" "$rate" ""        # switch → host: rate only
        echo "$NET3.$((i + 1)) slots=$slots" >>"$state/hostfile"
    done
    printf 'hosts=%s\nslots=%s\nrate=%s\ndelay=%s\n' "$n" "$slots" "$rate" "$delay" >"$state/info"
    # Wait until every link is up at both ends and its bridge port forwards (no ping here: it may not
    # be installed); fail loudly rather than let mpirun hang on a dead link.
    for ((i = 0; i < n; i++)); do
        local ok=0 try
        for try in $(seq 1 50); do
            if [[ "$(ip netns exec "$id-h$i" cat /sys/class/net/eth0/operstate)" == up \
                && "$(ip netns exec "$sw" cat "/sys/class/net/h$i/operstate")" == up ]] \
                && bridge -n "$sw" link show dev "h$i" | grep -q 'state forwarding'; then ok=1; break; fi
            sleep 0.1
        done
        [[ $ok == 1 ]] || die "up: the link of host h$i ($NET3.$((i + 1))) did not come up within 5 s"
    done
    done_up=1
    trap - EXIT
    echo "$id"
}

check_id() {
    [[ "${1:-}" =~ ^${PREFIX}[0-9]+$ ]] || die "expected an instance id (${PREFIX}<pid>, printed by 'up'), got '${1:-nothing}'"
    [[ -f "$STATE_ROOT/$1/info" && -n "$(namespaces_of "$1")" ]] || die "instance '$1' is not up (run 'harness.sh up N' first)"
}

do_run() {
    local id="${1:-}"; shift || true
    check_id "$id"
    local opts=() has_np=0
    while [[ $# -gt 0 && "$1" != "--" ]]; do
        [[ "$1" == "-np" || "$1" == "-n" || "$1" == "--np" ]] && has_np=1
        opts+=("$1"); shift
    done
    [[ "${1:-}" == "--" && $# -ge 2 ]] || die "run: expected 'run ID [mpirun options] -- PROGRAM [ARGS]'"
    shift
    # shellcheck disable=SC1090
    local hosts slots; hosts="$(sed -n 's/^hosts=//p' "$STATE_ROOT/$id/info")"; slots="$(sed -n 's/^slots=//p' "$STATE_ROOT/$id/info")"
    [[ $has_np == 1 ]] || opts=(-np "$((hosts * slots))" "${opts[@]}")
    command -v mpirun >/dev/null || die "run: mpirun not found (apt-get install openmpi-bin)"
    local env=()
    [[ $(id -u) == 0 ]] && env=(OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
    # plm_rsh_agent: Open MPI runs "<agent> <host address> <orted command line>" as it would ssh.
    # No tree spawn: every orted is started by mpirun itself, from the switch namespace.
    # btl tcp,self + pml ob1: no shared memory between ranks of different "hosts" (they share a kernel
    # and would otherwise use it) and no UCX; TCP restricted to the harness subnet for data (btl)
    # and for the runtime's own channel (oob), so all traffic crosses the veth links.
    exec ip netns exec "$id-sw" env "${env[@]}" mpirun \
        --hostfile "$STATE_ROOT/$id/hostfile" \
        --mca plm_rsh_agent "$SELF agent $id" \
        --mca plm_rsh_no_tree_spawn 1 \
        --mca pml ob1 --mca btl tcp,self \
        --mca btl_tcp_if_include "$SUBNET" --mca oob_tcp_if_include "$SUBNET" \
        "${opts[@]}" "$@"
}

do_agent() {  # agent ID [ssh-style options] HOST WORDS… (called by mpirun's rsh launcher)
    local id="$1"; shift
    while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
    local host="${1:-}"; shift || true
    [[ "$host" =~ ^10\.213\.0\.([0-9]+)$ ]] || die "agent: '$host' is not a harness host address ($NET3.1…)"
    local idx=$((BASH_REMATCH[1] - 1)) ns
    ns="$id-h$idx"
    [[ -n "$(namespaces_of "$id" | grep -x "$ns")" ]] || die "agent: no namespace $ns for $host"
    # As ssh does, the words form one command line for a shell (Open MPI quotes for that).
    # unshare --uts: the host's own hostname (h<i>), so ranks can tell "hosts" apart.
    exec ip netns exec "$ns" unshare --uts -- sh -c 'hostname "$1" && shift && exec sh -c "$*"' sh "h$idx" "$@"
}

do_stats() {
    local id="${1:-}"; check_id "$id"
    local hosts i d; hosts="$(sed -n 's/^hosts=//p' "$STATE_ROOT/$id/info")"
    for ((i = 0; i < hosts; i++)); do
        d="/sys/class/net/h$i/statistics"
        echo "h$i $(ip netns exec "$id-sw" cat "$d/rx_bytes") $(ip netns exec "$id-sw" cat "$d/tx_bytes")"
    done
}

do_exec() {
    local id="${1:-}" host="${2:-}"; check_id "$id"; shift 2
    [[ "$host" =~ ^h[0-9]+$ && -n "$(namespaces_of "$id" | grep -x "$id-$host")" ]] || die "exec: no host '$host' in $id"
    [[ $# -ge 1 ]] || die "exec: no command given"
    exec ip netns exec "$id-$host" unshare --uts -- sh -c 'hostname "$1" && shift && exec "$@"' sh "$host" "$@"
}

do_with() {
    local upargs=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do upargs+=("$1"); shift; done
    [[ "${1:-}" == "--" && $# -ge 2 ]] || die "with: expected 'with N [up options] -- COMMAND'"
    shift
    local id
    id="$(do_up "${upargs[@]}" --owner $$)"
    trap 'do_down "'"$id"'"' EXIT
    trap 'exit 130' INT TERM
    HARNESS_ID="$id" HARNESS="$SELF" "$@"
}

cmd="${1:-}"; shift || true
case "$cmd" in
    up) do_up "$@" ;;
    run) do_run "$@" ;;
    agent) do_agent "$@" ;;
    stats) do_stats "$@" ;;
    exec) do_exec "$@" ;;
    down) [[ $# -eq 1 ]] || die "down: expected one instance id"; do_down "$1" ;;
    prune) do_prune ;;
    with) do_with "$@" ;;
    ""|-h|--help|help) usage ;;
    *) die "unknown command '$cmd' (up, run, stats, exec, down, prune, with; --help for usage)" ;;
esac
