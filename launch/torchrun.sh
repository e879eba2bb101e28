#!/usr/bin/env bash
# Run mcode-train under torchrun on this node, passing every argument through to the trainer:
#
#   NPROC_PER_NODE=8 launch/torchrun.sh --preset 1b --data-path data/code_text_document \
#       --tokenizer-model tok.model --tensor-model-parallel-size 2 --save ckpt --load ckpt
#
# One node by default (torchrun --standalone). launch/slurm/common.sh runs this same script once on
# every node of a multi-node job, with NNODES > 1 and MASTER_ADDR/MASTER_PORT set (c10d rendezvous).
#
# Save and exit: SIGUSR1 (or SIGUSR2) sent to this script is forwarded to the training processes,
# which finish their step, save a checkpoint (with --save) and exit 0 (mcode-train --exit-signal).
# torchrun itself ignores SIGUSR1/2, which would otherwise kill it. SIGTERM/SIGINT go to torchrun,
# which passes SIGTERM to the workers (they save too) and kills what is left after 30 s.
#
# Knobs (environment):
#   NPROC_PER_NODE  processes on this node (default: GPUs that nvidia-smi lists, else 1)
#   NNODES          nodes in the job (default 1)
#   MASTER_ADDR / MASTER_PORT  rendezvous host and port of a multi-node job (node 0 of the job)
#   RDZV_ID         rendezvous id shared by the nodes of one job (default $SLURM_JOB_ID, else mcode)
#   NODE_RANK       this node's index, reported only: torch's c10d rendezvous numbers nodes itself
#                   (default $SLURM_NODEID, else 0)
#   TORCHRUN_LOG_DIR  also write each rank's output under this directory (torchrun --log-dir --tee 3)
#   PYTHON          interpreter (default python)
#   MCODE_MODULE    what each rank runs: megatron_code.train (default), megatron_code.profile
#                   (a profiling run: the same flags plus the profiler's; launch/slurm/profile_7b.sbatch)
#                   or megatron_code.preflight (GPU and link check; launch/slurm/preflight.sbatch)
#   DRY_RUN=1 or --dry-run: print the torchrun command, the environment and the trainer's
#                   --dry-run (resolved config + rank layout of the whole job); start nothing.
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/signals.sh
source "$REPO_DIR/launch/signals.sh"
reexec_with_default_signals "$0" "$@"  # before the USR1/USR2 traps below
PY=${PYTHON:-python}
MODULE=${MCODE_MODULE:-megatron_code.train}
case "$MODULE" in
    megatron_code.train|megatron_code.profile|megatron_code.preflight) ;;
    *) echo "torchrun.sh: MCODE_MODULE=$MODULE: expected megatron_code.train, megatron_code.profile" \
            "or megatron_code.preflight" >&2; exit 2 ;;
esac
# The repo's package without installing it; relative paths in the arguments keep the caller's cwd.
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

DRY_RUN=${DRY_RUN:-0}
train_args=()
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else train_args+=("$arg"); fi
done

gpu_count() {
    local count=0
    command -v nvidia-smi >/dev/null 2>&1 && count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    echo $(( count > 0 ? count : 1 ))
}

NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}

torchrun_cmd=("$PY" -m torch.distributed.run --nproc-per-node="$NPROC_PER_NODE")
if (( NNODES > 1 )); then
    : "${MASTER_ADDR:?multi-node runs need MASTER_ADDR (node 0 of the job) and MASTER_PORT}"
    : "${MASTER_PORT:?multi-node runs need MASTER_PORT}"
    # No --node-rank: torch ignores it for c10d (its rendezvous orders the nodes by address; each
    # node still holds consecutive global ranks, so TP groups stay inside a node).
    torchrun_cmd+=(--nnodes="$NNODES" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
                   --rdzv-id="${RDZV_ID:-${SLURM_JOB_ID:-mcode}}")
else
    torchrun_cmd+=(--standalone)
fi
[[ -n "${TORCHRUN_LOG_DIR:-}" ]] && torchrun_cmd+=(--log-dir="$TORCHRUN_LOG_DIR" --tee=3)
torchrun_cmd+=(-m "$MODULE" "${train_args[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
    echo "== torchrun command on node $NODE_RANK of $NNODES (nothing is started in a dry run) =="
    printf '%q ' "${torchrun_cmd[@]}"; echo
    echo "== launch environment (see docs/launch.md) =="
    for name in MCODE_MODULE NNODES NPROC_PER_NODE NODE_RANK MASTER_ADDR MASTER_PORT RDZV_ID TORCHRUN_LOG_DIR \
                CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG \
                TORCH_FR_BUFFER_SIZE TORCH_FR_DUMP_TEMP_FILE TORCH_NCCL_TRACE_BUFFER_SIZE \
                TORCH_NCCL_DEBUG_INFO_TEMP_FILE TORCH_NCCL_DUMP_ON_TIMEOUT \
                NCCL_IB_HCA NCCL_SOCKET_IFNAME NCCL_IB_GID_INDEX NCCL_NVLS_ENABLE PYTHONPATH; do
        printf '%s=%s\n' "$name" "${!name-(unset: library default)}"
    done
    echo
    exec "$PY" -m "$MODULE" "${train_args[@]}" --dry-run \
        --world-size $(( NNODES * NPROC_PER_NODE )) --nproc-per-node "$NPROC_PER_NODE"
fi

forward_to_workers() {
    # The workers are torchrun's direct children (each in its own session); they save and exit.
    # Found through /proc, not pkill: procps is missing from some images (a GPU container here
    # lost the signal that way), and a silent failure would let the job be killed unsaved.
    local stat rest ppid sent=()
    for stat in /proc/[0-9]*/stat; do
        rest=$(<"$stat") 2>/dev/null || continue
        rest=${rest##*) }  # fields after "pid (comm) "; comm may hold spaces
        read -r _ ppid _ <<<"$rest"
        if [[ "$ppid" == "$torchrun_pid" ]]; then
            stat=${stat#/proc/}
            kill "-$1" "${stat%/stat}" 2>/dev/null && sent+=("${stat%/stat}")
        fi
    done
    echo "torchrun.sh: SIG$1 forwarded to ${#sent[@]} worker(s) of torchrun $torchrun_pid: ${sent[*]:-none}" >&2
}
trap 'forward_to_workers USR1' USR1
trap 'forward_to_workers USR2' USR2
trap 'kill -TERM "$torchrun_pid" 2>/dev/null || true' TERM INT

# The workers inherit the ignored USR1/USR2 until mcode-train installs its handler.
(trap '' USR1 USR2; exec "${torchrun_cmd[@]}") &
torchrun_pid=$!
# `wait` returns early whenever a trapped signal arrives: wait again until torchrun has exited.
while kill -0 "$torchrun_pid" 2>/dev/null; do
    wait "$torchrun_pid" || true
done
wait "$torchrun_pid"
