#!/usr/bin/env bash
# selfdistill on SLURM: N nodes x G GPUs. srun starts one torchrun per node, the same command on every
# node (c10d rendezvous on the allocation's first node), so no argument is ever re-parsed by a shell.
#
#   sbatch --nodes=2 accelerate_configs/slurm_multinode.sh configs/dino_vit_small16.yaml data.path=/data/imagenet/train
#   sbatch --nodes=4 accelerate_configs/slurm_multinode.sh --deepspeed ds_configs/zero2.json RECIPE.yaml [overrides...]
#
# Options before the recipe:
#   --deepspeed JSON     train under DeepSpeed with this config (default: DDP)
#   --gpus-per-node G    ranks per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   --max-restarts K     a rank that dies restarts every rank from the last checkpoint, K times (default 3)
#   --port P             rendezvous port on the first node (default: 20000 + job id % 20000)
# Everything after the recipe reaches run_pretrain.py untouched; `--resume auto` is added unless you
# give --resume. Run sbatch from the repository root (or set SELFDISTILL_ENTRY=/path/run_pretrain.py).
#
# Preemption: SLURM sends USR1 to this script 180 s before the time limit (--signal below; scancel
# --signal=USR1 --batch JOBID does it by hand). The script passes USR1 through srun and torchrun to
# every rank; each finishes its optimizer step, the run writes a checkpoint at that step and exits 75,
# and the script requeues the job (scontrol requeue), which starts again with --resume auto. A run
# that exits 75 on its own (a SIGTERM that reached the ranks directly) is requeued the same way.
#SBATCH --job-name=selfdistill
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=80
#SBATCH --time=72:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
set -uo pipefail

usage="usage: sbatch --nodes=N slurm_multinode.sh [--deepspeed JSON] [--gpus-per-node G] [--max-restarts K] [--port P] RECIPE.yaml [section.key=value ...] [run_pretrain.py options ...]"
fail() { echo "slurm_multinode.sh: $*" >&2; exit 2; }

DEEPSPEED=""
GPUS=${SLURM_GPUS_ON_NODE:-8}
MAX_RESTARTS=3
PORT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --deepspeed) [ $# -ge 2 ] || fail "--deepspeed needs a JSON file; $usage"; DEEPSPEED=$2; shift 2 ;;
    --gpus-per-node) [ $# -ge 2 ] || fail "--gpus-per-node needs a number"; GPUS=$2; shift 2 ;;
    --max-restarts) [ $# -ge 2 ] || fail "--max-restarts needs a number"; MAX_RESTARTS=$2; shift 2 ;;
    --port) [ $# -ge 2 ] || fail "--port needs a number"; PORT=$2; shift 2 ;;
    -h | --help) echo "$usage"; exit 0 ;;
    --*) fail "unknown option $1 (options go before the recipe); $usage" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || fail "no recipe; $usage"
RECIPE=$1
shift
[ -f "$RECIPE" ] || fail "recipe $RECIPE not found (run sbatch from the repository root)"
[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a SLURM job (submit it with sbatch)"
for n in "$GPUS" "$MAX_RESTARTS" ${PORT:+"$PORT"}; do
  case "$n" in '' | *[!0-9]*) fail "expected a whole number, got '$n'" ;; esac
done
ENTRY=${SELFDISTILL_ENTRY:-run_pretrain.py}
[ -f "$ENTRY" ] || fail "$ENTRY not found: run sbatch from the repository root or set SELFDISTILL_ENTRY"
if [ -n "$DEEPSPEED" ]; then
  [ -f "$DEEPSPEED" ] || fail "DeepSpeed config $DEEPSPEED not found"
  # what `accelerate launch --use_deepspeed --deepspeed_config_file JSON` tells the Accelerator
  export ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_CONFIG_FILE=$DEEPSPEED
fi

resume=(--resume auto)
for arg in "$@"; do
  case "$arg" in --resume | --resume=*) resume=() ;; esac
done

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
[ -n "$HEAD_NODE" ] || fail "no host in SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"
PORT=${PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}

# torchrun forwards USR1 (and TERM) to the ranks and waits up to SELFDISTILL_SHUTDOWN_TIMEOUT seconds for
# their checkpoint before it kills them; keep it below the --signal lead time.
cmd=("${PYTHON:-python}" -m torch.distributed.run
  --nnodes "$NNODES" --nproc_per_node "$GPUS"
  --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$PORT" --rdzv_id "$SLURM_JOB_ID"
  --max_restarts "$MAX_RESTARTS"
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  --shutdown-timeout "${SELFDISTILL_SHUTDOWN_TIMEOUT:-150}"
  "$ENTRY" --config "$RECIPE" "$@" "${resume[@]}")

MODE=DDP
[ -n "$DEEPSPEED" ] && MODE="DeepSpeed ($DEEPSPEED)"
echo "slurm_multinode.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $NNODES nodes x $GPUS ranks, $MODE," \
  "rendezvous $HEAD_NODE:$PORT"
printf 'slurm_multinode.sh: command:'
printf ' %q' "${cmd[@]}"
printf '\n'

preempted=0
srun_pid=""
on_signal() {
  preempted=1
  echo "slurm_multinode.sh: $1: every rank finishes its step, checkpoints and stops; the job is requeued"
  # srun turns a TERM of its own into a KILL of the tasks; USR1 it forwards as it is
  [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

srun --kill-on-bad-exit=1 "${cmd[@]}" &
srun_pid=$!
wait "$srun_pid"
rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal interrupts wait; wait for srun itself
  wait "$srun_pid"
  rc=$?
done

if [ "$rc" -eq 75 ] || { [ "$preempted" -eq 1 ] && [ "$rc" -ne 0 ]; }; then
  echo "slurm_multinode.sh: requeueing job $SLURM_JOB_ID (exit code $rc); it resumes from the last checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
