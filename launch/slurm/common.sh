# Shared by the job scripts in launch/slurm/ (sourced, not run). The batch shell runs one srun
# step with one task per node; each task runs launch/torchrun.sh, which starts that node's
# NPROC_PER_NODE training processes under torchrun's c10d rendezvous on node 0.
#
# A job script sets JOB_NAME, JOB_NODES and GPUS_PER_NODE (what its #SBATCH lines ask for; a dry
# run simulates that allocation), TRAIN_ITERS, then calls
#   slurm_parse_args "$@"     --dry-run (or DRY_RUN=1) -> DRY_RUN; other args -> EXTRA_TRAIN_ARGS
#   slurm_setup               Slurm-derived variables, the NCCL/CUDA environment, job directories
#   slurm_launch ARGS...      run mcode-train ARGS on every node (a dry run prints instead)
#
# Requeue flow: `#SBATCH --signal=B:USR1@300` sends USR1 to this batch shell 5 minutes before the
# time limit; the trap forwards it to srun, which passes it to every task; the training processes
# finish their step, save to CKPT_DIR and exit 0; then this shell runs `scontrol requeue` (unless
# training is complete), and the requeued job (same job id and CKPT_DIR) resumes with --load.
# A run that fails after saving a newer checkpoint than the job started from is requeued too
# (REQUEUE_ON_FAILURE=0: not); one that saved nothing new is not, so a persistent error cannot loop.

# shellcheck source=launch/signals.sh
source "$REPO_DIR/launch/signals.sh"

slurm_parse_args() {
    reexec_with_default_signals "$0" "$@"  # the batch shell traps USR1 in slurm_launch
    DRY_RUN=${DRY_RUN:-0}
    EXTRA_TRAIN_ARGS=()
    local arg
    for arg in "$@"; do
        if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else EXTRA_TRAIN_ARGS+=("$arg"); fi
    done
}

_first_node() {
    if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        # `|| true`: head may close the pipe before scontrol has written every host name.
        { scontrol show hostnames "$SLURM_JOB_NODELIST" || true; } | head -n1
    elif [[ "$DRY_RUN" == 1 ]]; then
        echo localhost  # a dry run outside Slurm has no node list
    else
        echo "common.sh: cannot find node 0: scontrol or SLURM_JOB_NODELIST missing; set MASTER_ADDR" >&2
        return 1
    fi
}

_default() {  # _default NAME VALUE: export NAME=VALUE unless NAME is already set (set it to override)
    if [[ -z "${!1+set}" ]]; then export "$1=$2"; fi
}

slurm_environment() {
    # Warnings only; NCCL_DEBUG=INFO prints topology and transport choices (very long on 512 ranks).
    _default NCCL_DEBUG WARN
    # A failed or timed-out collective aborts the communicator and ends the process instead of
    # hanging until the job's time limit; torchrun then stops the node and srun
    # (--kill-on-bad-exit) the job. torchrun sets it too; torch < 2.2 read NCCL_ASYNC_ERROR_HANDLING.
    _default TORCH_NCCL_ASYNC_ERROR_HANDLING 1
    # Flight recorder: each rank keeps its last 20,000 collectives (group, sizes, state, Python
    # stack) in a ring buffer and writes it to $LOG_DIR/nccl_trace/rank_<N> when one times out, so
    # a hang names the rank that never joined (python -m torch.distributed.flight_recorder.fr_trace
    # $LOG_DIR/nccl_trace). Older torch reads only the TORCH_NCCL_* spellings (torch 2.13 reads
    # TORCH_FR_* first, then those), so both are set, the older from the newer.
    _default TORCH_FR_BUFFER_SIZE 20000
    _default TORCH_FR_DUMP_TEMP_FILE "$LOG_DIR/nccl_trace/rank_"
    _default TORCH_NCCL_TRACE_BUFFER_SIZE "$TORCH_FR_BUFFER_SIZE"
    _default TORCH_NCCL_DEBUG_INFO_TEMP_FILE "$TORCH_FR_DUMP_TEMP_FILE"
    _default TORCH_NCCL_DUMP_ON_TIMEOUT 1
    # One hardware work queue per GPU: kernels start in the order they are issued, so a
    # tensor-parallel collective issued before a GEMM starts first and overlaps with it (with
    # several queues the GEMM can be scheduled first and the collective waits behind it).
    _default CUDA_DEVICE_MAX_CONNECTIONS 1
    # CPU threads per training process: the node's CPUs shared by its processes (torchrun would
    # force 1). DataLoader workers set their own (1).
    local cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
    _default OMP_NUM_THREADS $(( cpus / NPROC_PER_NODE > 0 ? cpus / NPROC_PER_NODE : 1 ))
    # Cluster-specific, left to NCCL's detection unless set before sbatch:
    # NCCL_IB_HCA        RDMA devices for inter-node traffic (prefix list; `=` exact, `^` exclude),
    #                    e.g. =mlx5_0,mlx5_1,... for the compute fabric only, not the storage NICs
    #                    (list them with ibv_devinfo). Unset: every RDMA device.
    # NCCL_SOCKET_IFNAME IP interface for NCCL's bootstrap and socket fallback, e.g. ib0 or bond0.
    #                    Unset: NCCL prefers ib*, never lo/docker*.
    # NCCL_IB_GID_INDEX  RoCE only: the GID of the RoCE v2 address (usually 3). InfiniBand uses LIDs.
    # NCCL_NVLS_ENABLE   NVLink SHARP (in-switch reductions on NVSwitch H100/H200 nodes), on by
    #                    default where supported; 0 if communicator setup fails on nodes without
    #                    NVSwitch multicast support, or to give back the GPU memory its buffers take.
}

slurm_setup() {
    if [[ "$DRY_RUN" == 1 ]]; then
        # Node 0's view of the allocation the #SBATCH lines request.
        export SLURM_JOB_ID=${SLURM_JOB_ID:-0} SLURM_JOB_NAME=${SLURM_JOB_NAME:-$JOB_NAME}
        export SLURM_NNODES=${SLURM_NNODES:-$JOB_NODES} SLURM_NODEID=${SLURM_NODEID:-0}
    elif [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "not inside a Slurm job: submit with sbatch, or DRY_RUN=1 to print the plan" >&2
        return 1
    fi
    export NNODES=$SLURM_NNODES
    export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-$GPUS_PER_NODE}}
    MASTER_ADDR=${MASTER_ADDR:-$(_first_node)}
    # A port derived from the job id, so two jobs sharing node 0 do not collide.
    export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    export RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
    RUN_ROOT=${RUN_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    # Logs per job (a requeued job keeps its id and appends); checkpoints per job name, so a
    # requeued or resubmitted job resumes from the same --load.
    export LOG_DIR=${LOG_DIR:-$RUN_ROOT/logs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
    export CKPT_DIR=${CKPT_DIR:-$RUN_ROOT/checkpoints/${SLURM_JOB_NAME}}
    export TORCHRUN_LOG_DIR=${TORCHRUN_LOG_DIR:-$LOG_DIR/torchrun}
    slurm_environment
}

_latest_iteration() {  # the iteration of CKPT_DIR's latest checkpoint, or -1
    local marker="$CKPT_DIR/latest_checkpointed_iteration.txt"
    if [[ -f "$marker" ]]; then cat "$marker"; else echo -1; fi
}

_training_finished() {
    (( $(_latest_iteration) >= TRAIN_ITERS ))
}

_requeue_unfinished() {  # STATUS START_ITERATION: after srun, requeue the job if that is what to do
    local status=$1 start=$2 latest
    latest=$(_latest_iteration)
    if _training_finished; then
        return
    fi
    if [[ "$status" == 0 && "$EXIT_REQUESTED" == 1 ]]; then
        echo "$(date -Is) checkpoint saved; requeueing job $SLURM_JOB_ID to resume from $CKPT_DIR"
    elif [[ "$status" != 0 && "$latest" -gt "$start" && "${REQUEUE_ON_FAILURE:-1}" == 1 ]]; then
        # At 512 GPUs hardware faults end runs every few days (a GPU falling off the bus, a link
        # flap timing out a collective); the requeued job gets a new allocation and resumes.
        echo "$(date -Is) the run failed (exit status $status) after saving iteration $latest" \
             "(this job started at $start); requeueing job $SLURM_JOB_ID to resume from $CKPT_DIR"
    elif [[ "$status" != 0 ]]; then
        local why="no checkpoint saved since the job started (latest: $latest), so a requeue would most likely"
        why+=" fail the same way; fix the cause and resubmit (the run resumes from $CKPT_DIR)"
        [[ "$latest" -gt "$start" ]] && why="REQUEUE_ON_FAILURE=$REQUEUE_ON_FAILURE"
        echo "$(date -Is) the run failed (exit status $status); not requeued: $why"
        return
    else
        return
    fi
    scontrol requeue "$SLURM_JOB_ID"
}

_forward_exit_signal() {
    EXIT_REQUESTED=1
    echo "$(date -Is) USR1 (time limit near): training processes save and exit; the job is requeued"
    kill -USR1 "$SRUN_PID" 2>/dev/null || true  # srun passes it to the tasks on every node
}

slurm_launch() {
    local node_cmd=(bash "$REPO_DIR/launch/torchrun.sh" "$@")
    local srun_cmd=(srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 "${node_cmd[@]}")
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "== srun command of the batch shell (one task per node runs launch/torchrun.sh) =="
        printf '%q ' "${srun_cmd[@]}"; echo
        echo "== job =="
        echo "nodes $NNODES x $NPROC_PER_NODE processes; logs $LOG_DIR; checkpoints $CKPT_DIR (shared by requeues)"
        if (( TRAIN_ITERS > 0 )); then
            echo "train iters $TRAIN_ITERS; USR1 before the time limit -> save, exit, scontrol requeue"
        fi
        echo
        DRY_RUN=1 NODE_RANK=0 bash "$REPO_DIR/launch/torchrun.sh" "$@"
        return
    fi
    mkdir -p "$LOG_DIR" "$CKPT_DIR" "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"
    local start_iteration
    start_iteration=$(_latest_iteration)
    EXIT_REQUESTED=0
    trap _forward_exit_signal USR1
    "${srun_cmd[@]}" &
    SRUN_PID=$!
    while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true; done
    local status=0
    wait "$SRUN_PID" || status=$?
    _requeue_unfinished "$status" "$start_iteration"
    return "$status"
}
