"""Config dataclasses of the training run, one per component. Field names are Megatron-LM's
argument names (`--micro-batch-size` sets `micro_batch_size`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_code.model.config import ModelConfig
from megatron_code.parallel.state import ParallelConfig


@dataclass
class DataConfig:
    """Where tokens come from and how they are cut into samples."""

    data_path: list[str] = field(default_factory=list)
    """Dataset prefixes (without .bin/.idx), optionally weighted: `0.7 code 0.3 docs` or `code docs`."""
    split: str = "949,50,1"
    """Train/valid/test proportions of each dataset, e.g. 949,50,1 (not used with --valid-data-path)."""
    valid_data_path: list[str] = field(default_factory=list)
    """Validation datasets of their own (prefixes, optionally weighted like --data-path), e.g. a
    held-out corpus of real code beside synthetic training data. Then --data-path is all training
    data and --split is not used."""
    tokenizer_model: str | None = None
    """Path of the sentencepiece .model file the data was tokenized with."""
    seq_length: int = 256
    """Tokens per training sample."""
    reset_position_ids: bool = False
    """Restart position ids after each end-of-document token (packed sequences)."""
    reset_attention_mask: bool = False
    """Stop attention across end-of-document tokens (packed sequences see only their own document)."""
    eod_mask_loss: bool = False
    """Do not train on predicting the token after an end-of-document token."""
    data_cache_path: str | None = None
    """Where megatron-core caches sample indices (default: next to the data)."""
    num_workers: int = 2
    """DataLoader worker processes."""
    mock_data: bool = False
    """Train on megatron-core's synthetic token sequences instead of --data-path, or under
    --training-mode sft/dpo on synthetic conversations instead of the export (profiling and smoke
    tests; no tokenizer needed when --vocab-size is given)."""
    sft_data_path: list[str] = field(default_factory=list)
    """--training-mode sft: prefixes of the data tools' SFT export, optionally weighted (`0.7 A 0.3 B`);
    PREFIX reads PREFIX_prompt_document and PREFIX_response_document (.bin/.idx), e.g. export/sft."""
    dpo_data_path: list[str] = field(default_factory=list)
    """--training-mode dpo: prefixes of the data tools' DPO export, optionally weighted; PREFIX reads
    PREFIX_prompt_document, PREFIX_chosen_document and PREFIX_rejected_document, e.g. export/dpo."""


@dataclass
class OptimizerConfig:
    """AdamW with decoupled weight decay; norms and biases are not decayed."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW) for matrices and embeddings."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient L2 norm to this value (0 disables clipping)."""
    optimizer_impl: str = "auto"
    """The AdamW step: triton (TritonAdamW: multi-tensor Triton launches that also write the next
    step's bf16 weight copies, CUDA), torch (torch.optim.AdamW: fused on CUDA, foreach on CPU), auto
    (triton on CUDA where Triton imports, else torch)."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warmup, then decay to min_lr."""

    lr_warmup_iters: int = 0
    """Iterations of linear warmup from 0 to lr."""
    lr_decay_iters: int | None = None
    """Iteration at which decay reaches min_lr (default: train_iters)."""
    lr_decay_style: str = "cosine"
    """constant, linear, cosine, inverse-square-root, or WSD (warmup-stable-decay)."""
    lr_wsd_decay_style: str = "linear"
    """Shape of WSD's final decay: linear, cosine, exponential, minus_sqrt."""
    lr_wsd_decay_iters: int | None = None
    """Length of WSD's final decay phase (default: 10% of lr_decay_iters)."""


@dataclass
class TrainingConfig:
    """Batch, length, precision and cadence of the run."""

    micro_batch_size: int = 8
    """Samples per forward/backward pass on one data-parallel rank."""
    global_batch_size: int | None = None
    """Samples per optimizer step across all ranks (default: micro_batch_size x DP)."""
    train_iters: int = 300
    """Optimizer steps to train for."""
    bf16: bool = False
    """bfloat16 autocast with fp32 master weights (fp32 is the default, and right on CPU)."""
    seed: int = 1234
    """Seed of model init, data order and dropout."""
    training_mode: str = field(default="pretrain", metadata={"choices": ("pretrain", "sft", "dpo")})
    """pretrain: next-token loss on --data-path; sft: chat-formatted prompt + response pairs from
    --sft-data-path, packed into --seq-length rows, loss on response tokens only; dpo: Direct Preference
    Optimization on --dpo-data-path against a frozen reference model (--ref-load, default --load)."""
    dpo_beta: float = 0.1
    """DPO's beta: how far the policy may move from the reference (the loss is
    -log sigmoid(beta * ((chosen - ref chosen) - (rejected - ref rejected))) of summed response log-probs)."""
    eval_interval: int = 100
    """Run validation every this many steps (0 disables)."""
    eval_iters: int = 5
    """Global batches per validation run."""
    exit_interval: int | None = None
    """Stop (after saving, if --save is set) once this iteration is reached."""
    manual_gc: bool = False
    """Turn Python's automatic garbage collector off during training; every rank collects at the
    same steps instead (--manual-gc-interval) and after each validation. At scale the automatic
    collector pauses ranks at different moments and every collective waits for the paused one."""
    manual_gc_interval: int = 0
    """With --manual-gc: a collection of the young generations (generation 1) every this many
    steps; the full one runs after each validation (0: only that one)."""
    skip_steps: list[str] = field(default_factory=list)
    """Steps, numbered as the log numbers them, whose global batch is read and discarded without
    training (after a loss spike: roll back to an earlier checkpoint and skip the batches before
    it), e.g. `12001-12400 13050`. The learning-rate schedule moves on as if they ran. Steps at
    or before the resumed checkpoint's are ignored, so the flag can stay in a requeued job's
    script. Megatron-LM's --iterations-to-skip counts from 0: its K is step K+1 here."""
    exit_duration_in_mins: float | None = None
    """Save and exit 0 once the run has lasted this many minutes (counted from its start, before
    model build and data loading), all ranks after the same step: for schedulers whose time limit
    comes without a warning signal. None: no limit."""
    exit_signal: str = "SIGUSR1"
    """Signal that makes the run finish the current step, save a checkpoint (if --save is set) and
    exit 0; SIGTERM does the same. All ranks stop at the same iteration (the flag is all-reduced
    every step). Slurm's `--signal=B:USR1@300` plus launch/slurm/common.sh deliver it before the
    time limit."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: str | None = None
    """Directory to write checkpoints to."""
    load: str | None = None
    """Directory to resume from (its latest checkpoint); may equal --save."""
    save_interval: int | None = None
    """Save every this many steps (and at the end of training)."""
    finetune: bool = False
    """Load only model weights from --load and start at iteration 0 with fresh optimizer."""
    load_optim: bool = True
    """--no-load-optim: resume everything but AdamW's state (moments and step counts start fresh;
    the iteration, learning-rate schedule and data position go on), as after a loss spike some
    runs reset the moments, or to drop an optimizer state that no longer fits the run."""
    load_rng: bool = True
    """--no-load-rng: resume everything but the random-number generators (seeded from --seed as
    in a fresh start: other dropout masks from the resume on)."""
    ref_load: str | None = None
    """--training-mode dpo: checkpoint directory of the frozen reference model (its latest checkpoint;
    default: --load). Required when --load resumes a DPO run's own checkpoint."""
    keep_last: int | None = None
    """After each successful save keep only the newest K iter_* checkpoints (never deleting the one
    `latest` names); default: keep all."""
    async_save: bool = False
    """Write checkpoints in a background thread (torch.distributed.checkpoint.async_save): training
    continues while the files are written; the checkpoint is renamed into place and marked latest
    once complete (checked every step, before the next save and at the end of training)."""


@dataclass
class LoggingConfig:
    """Console, JSONL, TensorBoard and Weights & Biases logging."""

    log_interval: int = 10
    """Print a console line every this many steps."""
    metrics_file: str | None = None
    """JSONL file receiving one object per step (loss, lr, grad_norm, tokens_per_sec, ...)."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory (off when unset)."""
    wandb_project: str | None = None
    """Weights & Biases project (off when unset)."""
    wandb_exp_name: str | None = None
    """Weights & Biases run name."""
    wandb_save_dir: str | None = None
    """Weights & Biases local directory (default: under --save or the working directory)."""
    wandb_mode: str = "offline"
    """offline (default: nothing leaves the machine; `wandb sync` later) or online."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one accelerator for MFU (default: known for H100/H200/A100, else no MFU)."""
    log_straggler: bool = False
    """Every log interval, gather each rank's forward-backward time and host data wait and print
    the slowest ranks with their hosts (training/straggler.py; a gloo collective on the host)."""
    straggler_minmax_count: int = 1
    """With --log-straggler: how many of the slowest ranks the console line and the JSONL name."""


@dataclass
class LaunchConfig:
    """How many processes the job has, and planning a layout without starting them (--dry-run)."""

    dry_run: bool = False
    """Validate the whole config as a real run would (data files may be missing), print it resolved
    and the rank layout, and exit 0 without starting torch.distributed or touching a GPU."""
    world_size: int | None = None
    """Processes in the job (default: $WORLD_SIZE from torchrun; in a dry run also $SLURM_NNODES x
    processes per node). A real run refuses a value other than torchrun's."""
    nproc_per_node: int | None = None
    """Processes per node (default: $LOCAL_WORLD_SIZE from torchrun; in a dry run also
    $SLURM_GPUS_ON_NODE, else the whole world on one node)."""


@dataclass
class RunConfig:
    """Everything one training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model's shape and numerics."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How the run is split over processes."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and sampling."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """The learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Batch, precision and cadence."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging sinks."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Process count and dry-run planning."""


def from_saved(kind: type, values: dict):
    """An instance of the config dataclass `kind` from its section of a checkpoint's saved config
    (train_state.json): fields this version does not know are dropped, missing ones keep their
    defaults."""
    known = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in values.items() if k in known})
