"""Checks of --training-mode and of the SFT/DPO inputs, run by validate_run before anything is
built: flags that belong to another mode, the export's files and their alignment, the tokenizer
they were made with, the layouts DPO supports, and DPO's reference checkpoint."""
from __future__ import annotations

from megatron_code.errors import ConfigError
from megatron_code.training.chat_format import ChatFormat
from megatron_code.training.checkpointing import latest_iteration, read_train_state
from megatron_code.training.config import RunConfig
from megatron_code.training.conversations import (
    FIELDS, FLAGS, Conversations, check_alignment, check_export_tokenizer, check_files, field_path, files_exist,
)
from megatron_code.training.finetune_data import mode_blend, split_records

MODES = ("pretrain", "sft", "dpo")


def saved_training_mode(root: str | None) -> str | None:
    """The --training-mode of the latest checkpoint under root (pretrain for checkpoints that
    predate the field), or None when root holds none or its train_state.json is unreadable (the
    trainer's own load reports that)."""
    try:
        state = read_train_state(root) if root else None
    except (OSError, ValueError):
        return None
    if state is None:
        return None
    return state.get("config", {}).get("training", {}).get("training_mode", "pretrain")


def _check_flags_of_mode(cfg: RunConfig) -> None:
    mode, d = cfg.training.training_mode, cfg.data
    if mode not in MODES:
        raise ConfigError(f"--training-mode must be one of {', '.join(MODES)}, got {mode!r}.")
    for other in ("sft", "dpo"):
        if other != mode and getattr(d, f"{other}_data_path"):
            raise ConfigError(f"{FLAGS[other]} is set but --training-mode is {mode}; "
                              f"add --training-mode {other} or drop {FLAGS[other]}.")
    if cfg.checkpoint.ref_load and mode != "dpo":
        raise ConfigError(f"--ref-load is only read by --training-mode dpo (this run: {mode}); drop it.")
    if mode == "pretrain":
        return
    for flag, given in (("--data-path", bool(d.data_path)), ("--eod-mask-loss", d.eod_mask_loss)):
        if given:
            raise ConfigError(f"{flag} belongs to pretraining; --training-mode {mode} reads {FLAGS[mode]} "
                              "(its loss covers the response tokens, each response's EOD included). Drop it.")
    if d.mock_data and getattr(d, f"{mode}_data_path"):
        raise ConfigError(f"--mock-data (synthetic conversations) and {FLAGS[mode]} exclude each other: drop one.")


def _check_resumed_mode(cfg: RunConfig) -> None:
    """Resuming (no --finetune) a checkpoint of another mode would continue its step count,
    optimizer and data position on other data."""
    ck, mode = cfg.checkpoint, cfg.training.training_mode
    saved = None if ck.finetune else saved_training_mode(ck.load)
    if saved is not None and saved != mode:
        raise ConfigError(
            f"--load {ck.load} holds a --training-mode {saved} checkpoint but this run is {mode}: add "
            f"--finetune to start {mode} from its weights (step 0, fresh optimizer), or point --load at "
            f"a {mode} run's checkpoints."
        )


def _check_dpo_setup(cfg: RunConfig, require_files: bool) -> None:
    p, ck = cfg.parallel, cfg.checkpoint
    if p.pipeline_model_parallel_size > 1 or p.context_parallel_size > 1:
        raise ConfigError(
            "--training-mode dpo runs with tensor, sequence and data parallelism only (got "
            f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}, --context-parallel-size "
            f"{p.context_parallel_size}): its loss needs each conversation's whole log-probability on one "
            "rank. Use TP (+ SP) x DP, with --use-distributed-optimizer and recompute for memory."
        )
    if cfg.training.dpo_beta <= 0:
        raise ConfigError(f"--dpo-beta must be positive, got {cfg.training.dpo_beta}.")
    reference = ck.ref_load or ck.load
    if not reference and cfg.data.mock_data:
        return  # the reference is the policy's initial weights (DPOTrainer)
    if not reference:
        raise ConfigError("--training-mode dpo needs a frozen reference model: --ref-load CKPT, or --load "
                          "CKPT --finetune (its weights are then both the starting policy and the reference); "
                          "with --mock-data (profiling) the reference may be the initial weights.")
    if not ck.ref_load and not ck.finetune and saved_training_mode(ck.load) == "dpo":
        raise ConfigError(
            f"--load {ck.load} resumes a DPO run: its weights are the partly trained policy, not the "
            "reference. Pass --ref-load with the checkpoint that run started from (e.g. the SFT model)."
        )
    if require_files and latest_iteration(reference) is None:
        flag = "--ref-load" if ck.ref_load else "--load (the DPO reference)"
        raise ConfigError(f"{flag} {reference}: no checkpoint there (no latest_checkpointed_iteration.txt); "
                          "point it at a finished checkpoint directory, e.g. the SFT run's --save.")


def _check_export(cfg: RunConfig, tokenizer, prefix: str) -> None:
    from megatron_code.training.validate import check_data_matches_tokenizer  # validate imports this module

    mode = cfg.training.training_mode
    conversations = Conversations(prefix, mode)
    check_alignment(conversations, tokenizer.eod)
    check_export_tokenizer(prefix, mode, cfg.data.tokenizer_model)
    check_data_matches_tokenizer([field_path(prefix, f) for f in FIELDS[mode]], cfg.model.padded_vocab_size(),
                                 FLAGS[mode])
    chat = ChatFormat.from_tokenizer(tokenizer)
    for split_index in (0, 1) if cfg.training.eval_interval else (0,):
        split_records(conversations, split_index, cfg.data.split, cfg.data.seq_length + 1, chat.overhead)


def check_training_mode(cfg: RunConfig, tokenizer, require_files: bool) -> None:
    """Every check of --training-mode and its inputs. require_files=False (dry run): missing
    export files, tokenizer and reference checkpoint are allowed; what is present is checked."""
    _check_flags_of_mode(cfg)
    _check_resumed_mode(cfg)
    mode = cfg.training.training_mode
    if mode == "pretrain":
        return
    if mode == "dpo":
        _check_dpo_setup(cfg, require_files)
    for prefix in [] if cfg.data.mock_data else mode_blend(cfg)[0]:
        if not require_files and not files_exist(prefix, mode):
            continue
        check_files(prefix, mode)
        if tokenizer is not None:
            _check_export(cfg, tokenizer, prefix)
