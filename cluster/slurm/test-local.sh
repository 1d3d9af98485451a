#!/usr/bin/env bash
# cluster/slurm/train.sbatch on a real one-host Slurm (issue 14), run by scripts/test.sh after the Swift suite.
# local-cluster.sh brings up munge + slurmctld + slurmd (Debian's slurm-wlm) in a temporary folder; the demo config
# (tiny model) trains on 2 tasks:
#   1. srun --mpi=pmix, uninterrupted                       → the reference LoRA
#   2. mpirun inside the allocation                         → the same LoRA
#   3. SIGUSR1 to the batch shell mid-training (steps slowed to 0.5 s), as `--signal=B:USR1@N` sends it before a time
#      limit: the batch shell forwards the signal, rank 0 saves, the script requeues, the requeued job resumes → the
#      same LoRA, after at least one restart. The test sends the signal itself (`scancel --batch --signal=USR1`) once
#      step 5 is logged: Slurm may send a `--signal` up to 60 s early ("resolution of event handling", sbatch(1)),
#      which on a short test limit lands anywhere from model load to the end.
# "The same LoRA": equal sshs_model_hash (SHA-256 of the tensor bytes, kohya's addnet hash).
# Exit 0 on success, 1 on a failure, 0 with a loud SKIPPED line when the machine cannot run Slurm.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LC=cluster/slurm/local-cluster.sh
if ! why=$($LC check 2>&1); then
    echo "=================================================================="
    echo "SLURM TEST SKIPPED: this machine cannot run a local Slurm: $why"
    echo "=================================================================="
    exit 0
fi
W=$(mktemp -d /tmp/lora-dist-slurm.XXXXXX)
cleanup() { $LC down "$W/slurm" >/dev/null 2>&1; rm -rf "$W"; }
trap cleanup EXIT
eval "$($LC up "$W/slurm")" || { echo "slurm test: the local cluster did not start"; exit 1; }
export LORA_DIST="${LORA_DIST:-$ROOT/.build/debug/lora-dist}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fail=0

submit() {   # name launch steps [sbatch options…]; prints the job id
    local name=$1 launch=$2 steps=$3; shift 3
    TRAIN_CMD="$LORA_DIST train configs/demo.toml --threads 1 --resume auto --requeue-on-stop --output-dir $W/$name --max-train-steps $steps" \
    LAUNCH=$launch sbatch --parsable --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --time=10 "$@" \
        --output="$W/$name.out" cluster/slurm/train.sbatch configs/demo.toml | cut -d';' -f1
}

wait_job() {   # id → prints "STATE RESTARTS"; a requeued job is made eligible at once (Slurm delays it ~2 min)
    local id=$1 q state restarts
    for _ in $(seq 1 300); do
        q=$(scontrol -o show job "$id" 2>/dev/null)
        state=$(grep -o 'JobState=[A-Z_]*' <<<"$q" | cut -d= -f2)
        restarts=$(grep -o 'Restarts=[0-9]*' <<<"$q" | cut -d= -f2)
        case "$state" in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) echo "$state $restarts"; return ;;
            # Only once the previous run's steps are gone from the node: starting the requeued job while its old
            # step is still being torn down fails the new step's launch ("aborted before step completely launched").
            PENDING) grep -q 'Reason=BeginTime' <<<"$q" && sinfo -h -o %t | grep -qx idle \
                && ! pgrep -f "slurmstepd: \[$id\." >/dev/null && scontrol update JobId="$id" StartTime=now >/dev/null 2>&1 ;;
        esac
        sleep 1
    done
    echo "TIMEOUT_WAITING ${restarts:-0}"
}

model_hash() { "$LORA_DIST" inspect "$1" 2>/dev/null | sed -n 's/^ *sshs_model_hash: //p'; }

check() {   # label condition-result message
    if [[ "$2" == ok ]]; then echo "slurm test: PASS $1"; else echo "slurm test: FAIL $1: $3"; fail=1; fi
}

a=$(submit straight srun 40)
read -r state _ <<<"$(wait_job "$a")"
ref=$(model_hash "$W/straight/demo.safetensors")
check "srun --mpi=pmix trains" "$([[ $state == COMPLETED && -n $ref ]] && echo ok)" "state $state; $(tail -5 "$W/straight.out")"

m=$(submit mpirun mpirun 40)
read -r state _ <<<"$(wait_job "$m")"
h=$(model_hash "$W/mpirun/demo.safetensors")
check "mpirun in the allocation trains the same LoRA" "$([[ $state == COMPLETED && $h == "$ref" ]] && echo ok)" \
    "state $state, hash $h vs $ref; $(tail -5 "$W/mpirun.out")"

s=$(LORA_DIST_TEST_STEP_DELAY=0.5 submit limited srun 40)
for _ in $(seq 1 300); do grep -qE '^step ([5-9]|[1-9][0-9])/' "$W/limited.out" 2>/dev/null && break; sleep 0.5; done
scancel --batch --signal=USR1 "$s"
read -r state restarts <<<"$(wait_job "$s")"
h=$(model_hash "$W/limited/demo.safetensors")
log=$(grep -vE '^step' "$W/limited.out")
check "USR1 to the batch shell mid-training: save, requeue, resume, same LoRA" \
    "$([[ $state == COMPLETED && ${restarts:-0} -ge 1 && $h == "$ref" ]] && grep -q 'requeueing job' <<<"$log" && grep -q 'stopped by SIGUSR1' <<<"$log" && ! grep -q 'before training started' <<<"$log" && echo ok)" \
    "state $state, restarts $restarts, hash $h vs $ref; log:
$log"
exit $fail
