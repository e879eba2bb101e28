"""Checks of a whole run, done before any model, dataset or process group is built. Each problem
raises ConfigError naming the flag or file, what was expected and what was found."""
from __future__ import annotations

import os

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_code.errors import ConfigError
from megatron_code.parallel.pipeline import check_pipeline
from megatron_code.parallel.state import distributed_timeout, validate_layout, virtual_stages
from megatron_code.tokenizer import SentencePieceTokenizer
from megatron_code.training.checkpointing import check_checkpoint_root, latest_iteration
from megatron_code.training.config import CheckpointConfig, RunConfig
from megatron_code.training.data import SyntheticVocabulary, check_data_files, pretraining_prefixes, split_weights
from megatron_code.training.exit_signal import parse_exit_signal
from megatron_code.training.finetune_checks import check_training_mode
from megatron_code.training.lr_schedule import LearningRateSchedule
from megatron_code.training.optimizer import check_optimizer_impl
from megatron_code.training.skip_steps import parse_skip_steps

# Enough tokens to catch data tokenized with another tokenizer, cheap on an mmap.
_TOKENS_TO_SCAN = 1_000_000


def load_tokenizer(cfg: RunConfig) -> SentencePieceTokenizer | SyntheticVocabulary:
    if cfg.data.mock_data and not cfg.data.tokenizer_model:
        if cfg.model.vocab_size is None:
            raise ConfigError("--mock-data without --tokenizer-model needs --vocab-size (e.g. 49152).")
        # megatron-core's mock documents carry no EOD; the synthetic SFT/DPO responses end with id 2.
        pretrain = cfg.training.training_mode == "pretrain"
        if pretrain and (cfg.data.reset_attention_mask or cfg.data.reset_position_ids):
            raise ConfigError("--reset-attention-mask/--reset-position-ids need the tokenizer's EOD id: "
                              "give --tokenizer-model with --mock-data.")
        return SyntheticVocabulary(cfg.model.vocab_size)
    if not cfg.data.tokenizer_model:
        raise ConfigError("--tokenizer-model is required: the sentencepiece .model the data was built with.")
    try:
        tokenizer = SentencePieceTokenizer(cfg.data.tokenizer_model)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"--tokenizer-model {cfg.data.tokenizer_model} has {tokenizer.vocab_size} tokens but "
            f"--vocab-size is {cfg.model.vocab_size}: the model cannot embed them. Drop --vocab-size "
            "(it defaults to the tokenizer's) or raise it."
        )
    return tokenizer


def check_batch_sizes(cfg: RunConfig, data_parallel_size: int) -> None:
    t = cfg.training
    if t.micro_batch_size <= 0:
        raise ConfigError(f"--micro-batch-size must be positive, got {t.micro_batch_size}.")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * data_parallel_size
    if t.global_batch_size <= 0:
        raise ConfigError(f"--global-batch-size must be positive, got {t.global_batch_size}.")
    if t.global_batch_size % (t.micro_batch_size * data_parallel_size):
        raise ConfigError(
            f"--global-batch-size ({t.global_batch_size}) must be divisible by --micro-batch-size "
            f"({t.micro_batch_size}) x data-parallel size ({data_parallel_size})."
        )
    if t.train_iters <= 0:
        raise ConfigError(f"--train-iters must be positive, got {t.train_iters}.")


def check_data_matches_tokenizer(prefixes: list[str], padded_vocab: int, flag: str = "--data-path") -> None:
    for prefix in prefixes:
        dataset = IndexedDataset(prefix)
        if len(dataset) == 0:
            raise ConfigError(f"{flag} {prefix}: the dataset holds no documents.")
        sizes = dataset.sequence_lengths
        count = int(np.searchsorted(np.cumsum(sizes), _TOKENS_TO_SCAN)) + 1
        largest = max(int(dataset[i].max()) for i in range(min(count, len(dataset))) if sizes[i])
        if largest >= padded_vocab:
            raise ConfigError(
                f"{flag} {prefix}: token id {largest} is outside the model's vocabulary "
                f"({padded_vocab} rows). The data was tokenized with a different tokenizer than "
                "--tokenizer-model; re-run mcode-preprocess-data with this tokenizer."
            )


def validate_job(cfg: RunConfig, world_size: int, require_files: bool = True):
    """Every check of a run on world_size processes: the layout, then validate_run, then the
    pipeline schedule. train() and the dry run both call this, so a dry run resolves the config
    exactly as the real run will. Returns the tokenizer (see validate_run)."""
    dp = validate_layout(cfg.parallel, world_size, cfg.model, cfg.data.seq_length)
    if (cfg.parallel.context_parallel_size > 1 and cfg.data.reset_attention_mask
            and cfg.model.attention_backend != "sdpa"):
        raise ConfigError(
            "--reset-attention-mask with --context-parallel-size > 1 needs --attention-backend sdpa "
            f"(got {cfg.model.attention_backend}): document masks across CP chunks use an explicit mask."
        )
    tokenizer = validate_run(cfg, data_parallel_size=dp, require_files=require_files)
    if cfg.parallel.pipeline_model_parallel_size > 1:
        t = cfg.training
        check_pipeline(cfg.parallel.pipeline_schedule, cfg.parallel.pipeline_model_parallel_size,
                       virtual_stages(cfg.parallel, cfg.model.num_layers), cfg.model,
                       t.global_batch_size // (t.micro_batch_size * dp))
    return tokenizer


def _at_least(low):
    return lambda value: value >= low, f">= {low}"


def _positive():
    return lambda value: value > 0, "> 0"


def _fraction():
    return lambda value: 0 <= value < 1, "in [0, 1)"


def check_numbers(cfg: RunConfig) -> None:
    """Values outside their range would otherwise crash mid-run (a zero log interval divides by
    zero at the first log line, a beta of 1.5 fails in torch's AdamW after the model is built,
    seed -1 in numpy) or train silently wrong (a negative learning rate ascends, zero validation
    batches log a validation loss of 0)."""
    t, o, sc, d = cfg.training, cfg.optimizer, cfg.scheduler, cfg.data
    checks = [
        ("--seq-length", d.seq_length, _positive()), ("--num-workers", d.num_workers, _at_least(0)),
        ("--lr", o.lr, _at_least(0)), ("--min-lr", o.min_lr, _at_least(0)),
        ("--weight-decay", o.weight_decay, _at_least(0)), ("--clip-grad", o.clip_grad, _at_least(0)),
        ("--adam-beta1", o.adam_beta1, _fraction()), ("--adam-beta2", o.adam_beta2, _fraction()),
        ("--adam-eps", o.adam_eps, _at_least(0)), ("--lr-warmup-iters", sc.lr_warmup_iters, _at_least(0)),
        ("--eval-interval", t.eval_interval, _at_least(0)), ("--log-interval", cfg.logging.log_interval, _at_least(1)),
        ("--straggler-minmax-count", cfg.logging.straggler_minmax_count, _at_least(1)),
        ("--seed", t.seed, (lambda value: 0 <= value < 2**32, "in [0, 2**32)")),
    ]
    checks += [(flag, value, _positive()) for flag, value in (
        ("--lr-decay-iters", sc.lr_decay_iters), ("--lr-wsd-decay-iters", sc.lr_wsd_decay_iters),
        ("--save-interval", cfg.checkpoint.save_interval), ("--exit-interval", t.exit_interval)) if value is not None]
    if t.eval_interval:
        checks.append(("--eval-iters", t.eval_iters, _at_least(1)))
    for flag, value, (accepts, expected) in checks:
        if not accepts(value):
            raise ConfigError(f"{flag} must be {expected}, got {value}.")
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr ({o.min_lr}) exceeds --lr ({o.lr}): the decay would raise the rate. Set "
                          "--min-lr at or below --lr (a --preset brings its own --min-lr with its --lr).")


def check_params_dtype(cfg: RunConfig) -> None:
    """float32 parameters are their own master weights; bfloat16 ones need the distributed
    optimizer, which keeps their fp32 master weights sharded (Megatron-LM's distributed optimizer)."""
    dtype, p = cfg.model.params_dtype, cfg.parallel
    if dtype == "float32":
        return
    if dtype != "bfloat16" or not (p.use_distributed_optimizer and cfg.training.bf16):
        raise ConfigError(
            f"--params-dtype {dtype}: training needs fp32 master weights. Use --params-dtype bfloat16 with "
            "--bf16 and --use-distributed-optimizer (the optimizer keeps the fp32 master weights, sharded), "
            "or leave --params-dtype at float32 (the parameters are the master weights; --bf16 computes in bf16)."
        )
    if p.pipeline_model_parallel_size > 1 and p.pipeline_schedule in ("zbv", "dualpipev"):
        raise ConfigError(f"--params-dtype bfloat16 with --pipeline-schedule {p.pipeline_schedule}: the zero-bubble "
                          "schedules write weight gradients outside autograd's hooks, which fold bf16 gradients into "
                          "the fp32 ones; use 1f1b or interleaved-1f1b, or --params-dtype float32.")
    if cfg.model.fp8_format and cfg.model.fp8_backend == "te":
        raise ConfigError("--params-dtype bfloat16 with --fp8-backend te has not been verified on a GPU; use "
                          "--fp8-backend torch, or --params-dtype float32.")


def data_files_exist(prefix: str) -> bool:
    """Both PREFIX.bin and PREFIX.idx exist."""
    return all(os.path.isfile(prefix + ext) for ext in (".bin", ".idx"))


def _tokenizer_for_plan(cfg: RunConfig):
    """A dry run may plan without the tokenizer file when --vocab-size says how big it is."""
    path = cfg.data.tokenizer_model
    if path and not os.path.isfile(path):
        if cfg.model.vocab_size is None:
            raise ConfigError(f"--tokenizer-model {path} does not exist; a dry run without it needs "
                              "--vocab-size (the tokenizer's vocabulary size).")
        return None
    return load_tokenizer(cfg)


def _check_load(cfg: RunConfig, require_files: bool) -> None:
    """Each of these would otherwise start from random weights without a word, or fail mid-load."""
    ck = cfg.checkpoint
    if ck.finetune and not ck.load:
        raise ConfigError("--finetune needs --load (the checkpoint whose weights to start from).")
    unloaded = [flag for flag, loaded in (("--no-load-optim", ck.load_optim), ("--no-load-rng", ck.load_rng))
                if not loaded]
    if unloaded and not ck.load:
        raise ConfigError(f"{' and '.join(unloaded)} without --load: there is no checkpoint to leave its parts out "
                          "of. Add --load, or drop the flag.")
    for root, flag, weights_only in ((ck.load, "--load", ck.finetune), (ck.ref_load, "--ref-load", True)):
        if root:
            check_checkpoint_root(root, flag, weights_only, complete=require_files)
    if require_files:
        _check_save(ck)
    if not require_files or not ck.load or latest_iteration(ck.load) is not None:
        return
    if ck.finetune:
        raise ConfigError(f"--finetune --load {ck.load}: no checkpoint there (no "
                          "latest_checkpointed_iteration.txt); point --load at a finished checkpoint directory.")
    if not _same_directory(ck.load, ck.save):
        # --load == --save with nothing there yet is the first start of a restartable job.
        raise ConfigError(f"--load {ck.load}: no checkpoint there (no latest_checkpointed_iteration.txt). A run "
                          "starts from scratch on an empty --load only when it equals --save (the same command "
                          "line restarts a preempted job); fix the path, or drop --load to start from scratch.")


def _check_save(ck: CheckpointConfig) -> None:
    """A --save directory holding another run's checkpoints is only for resuming that run: any
    other run's saves would replace its iter_* directories and latest marker."""
    latest = latest_iteration(ck.save) if ck.save else None
    if latest is not None and (ck.finetune or not _same_directory(ck.load, ck.save)):
        raise ConfigError(
            f"--save {ck.save} already holds checkpoints (latest: iteration {latest}) that this run does not "
            f"resume from ({'--finetune' if ck.finetune else '--load ' + str(ck.load)}), and its saves would "
            "overwrite them. Use a new --save directory, or --load the same directory (without --finetune) "
            "to resume that run.")


def _same_directory(a: str | None, b: str | None) -> bool:
    return bool(a and b) and os.path.abspath(a) == os.path.abspath(b)


def validate_run(cfg: RunConfig, data_parallel_size: int = 1,
                 require_files: bool = True) -> SentencePieceTokenizer | SyntheticVocabulary | None:
    """Validate everything; fill derived defaults (vocab size, global batch). Returns the tokenizer.
    require_files=False (dry run): the tokenizer, the .bin/.idx files and a --finetune checkpoint
    may be missing; those present are checked (None is returned for a missing tokenizer)."""
    tokenizer = load_tokenizer(cfg) if require_files else _tokenizer_for_plan(cfg)
    cfg.model.validate()
    check_batch_sizes(cfg, data_parallel_size)
    check_numbers(cfg)
    parse_skip_steps(cfg.training.skip_steps, cfg.training.train_iters)
    if cfg.data.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"--seq-length ({cfg.data.seq_length}) exceeds --max-position-embeddings "
            f"({cfg.model.max_position_embeddings}); raise the latter or shorten the sequences."
        )
    _check_load(cfg, require_files)
    check_training_mode(cfg, tokenizer, require_files)
    datasets = _pretraining_datasets(cfg, require_files)
    check_params_dtype(cfg)
    distributed_timeout(cfg.parallel.distributed_timeout_minutes)
    if cfg.parallel.ddp_bucket_size is not None and cfg.parallel.ddp_bucket_size < 1:
        raise ConfigError(f"--ddp-bucket-size must be >= 1 (gradient elements per bucket), got "
                          f"{cfg.parallel.ddp_bucket_size}.")
    check_optimizer_impl(cfg.optimizer.optimizer_impl)
    if cfg.parallel.overlap_param_gather and not cfg.parallel.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather overlaps the distributed optimizer's parameter "
                          "all-gather: add --use-distributed-optimizer or drop it.")
    if cfg.training.manual_gc_interval < 0 or (cfg.training.manual_gc_interval and not cfg.training.manual_gc):
        raise ConfigError(f"--manual-gc-interval {cfg.training.manual_gc_interval}: give a step count >= 0 "
                          "together with --manual-gc (which turns the automatic collector off).")
    if cfg.checkpoint.save_interval and not cfg.checkpoint.save:
        raise ConfigError("--save-interval is set but --save (the checkpoint directory) is not.")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"--keep-last must be >= 1 (checkpoints to keep), got {cfg.checkpoint.keep_last}.")
    parse_exit_signal(cfg.training.exit_signal)
    if cfg.training.exit_duration_in_mins is not None and not cfg.training.exit_duration_in_mins > 0:
        raise ConfigError(f"--exit-duration-in-mins must be > 0 (minutes), got {cfg.training.exit_duration_in_mins}.")
    LearningRateSchedule(cfg.scheduler, cfg.optimizer, cfg.training.train_iters)
    for flag, prefixes in datasets.items():
        check_data_matches_tokenizer(prefixes, cfg.model.padded_vocab_size(), flag)
    return tokenizer


def _pretraining_datasets(cfg: RunConfig, require_files: bool) -> dict[str, list[str]]:
    """Check the pretraining data flags; return the prefixes to scan per flag (a dry run leaves
    out missing files)."""
    d, mode = cfg.data, cfg.training.training_mode
    if d.mock_data and (d.data_path or d.valid_data_path):
        raise ConfigError("--mock-data and --data-path / --valid-data-path exclude each other: drop one.")
    if d.valid_data_path and mode != "pretrain":
        raise ConfigError(f"--valid-data-path is for pretraining data; --training-mode {mode} takes its "
                          "validation rows from --split of its own data path.")
    if d.valid_data_path and not cfg.training.eval_interval:
        raise ConfigError("--valid-data-path is given but --eval-interval is 0: nothing would read it. "
                          "Set --eval-interval N, or drop --valid-data-path.")
    weights = split_weights("1,1,1" if d.mock_data or d.valid_data_path else d.split)
    if cfg.training.eval_interval and weights[1] == 0:
        raise ConfigError(
            f"--eval-interval {cfg.training.eval_interval} needs a validation split, but --split "
            f"{d.split} gives it weight 0. Use e.g. --split 949,50,1, --valid-data-path, or --eval-interval 0."
        )
    if d.mock_data or mode != "pretrain":
        return {}
    datasets = pretraining_prefixes(d)
    for flag, prefixes in datasets.items():
        datasets[flag] = prefixes if require_files else [p for p in prefixes if data_files_exist(p)]
        check_data_files(datasets[flag], flag)
    return datasets
