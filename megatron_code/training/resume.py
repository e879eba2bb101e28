"""Starting a run from a checkpoint: refuse one of another model shape with the differing field
named, then load it fully (a resume: weights, optimizer, RNG, iteration, data position) or its
weights only (--finetune)."""
from __future__ import annotations

from megatron_code.errors import ConfigError
from megatron_code.parallel.state import ParallelState
from megatron_code.training import checkpointing
from megatron_code.training.config import RunConfig
from megatron_code.training.metrics import print_rank0
from megatron_code.training.resume_notes import resume_notes


def resume_from_checkpoint(cfg: RunConfig, model, optimizer, parallel: ParallelState,
                           is_main: bool) -> tuple[int, int]:
    """Load --load's checkpoint into model and optimizer; returns (iteration, consumed samples)
    to continue from: (0, 0) for --finetune or when --load holds no checkpoint yet."""
    ck = cfg.checkpoint
    saved = checkpointing.read_train_state(ck.load)
    if saved is None:
        print_rank0(f"no checkpoint in --load {ck.load}; starting from scratch", enabled=is_main)
        return 0, 0
    check_same_model(saved, cfg)
    source = saved.get("converted_from")
    if source and not ck.finetune:
        where = source.get("path", source) if isinstance(source, dict) else source
        raise ConfigError(
            f"--load {ck.load}: this checkpoint was converted from {where} and "
            "holds weights only (no optimizer state); add --finetune to start training from it."
        )
    # --finetune: weights only (the optimizer still takes the master weights of bf16 parameters)
    checkpointing.load_checkpoint(ck.load, model, optimizer, parallel, restore_rng=ck.load_rng and not ck.finetune,
                                  optimizer_state=ck.load_optim and not ck.finetune, restore_fp8=not ck.finetune)
    print_rank0(f"resumed from {ck.load} at iteration {saved['iteration']}", enabled=is_main)
    if ck.finetune:
        return 0, 0
    iteration, consumed = saved["iteration"], saved["consumed_samples"]
    skipped = [what for what, loaded in (("AdamW's state (--no-load-optim: moments and step counts start "
                                          "fresh)", ck.load_optim),
                                         ("the RNG states (--no-load-rng: seeded from --seed)", ck.load_rng))
               if not loaded]
    for note in resume_notes(saved, cfg, iteration, consumed) + [f"not loaded: {what}" for what in skipped]:
        print_rank0(f"note: {note}", enabled=is_main)
    return iteration, consumed


def check_same_model(state: dict, cfg: RunConfig, flag: str = "--load") -> None:
    """A checkpoint of another shape would fail deep inside DCP; say which field differs instead."""
    saved = state.get("config", {}).get("model", {})
    shape_fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "group_query_attention", "kv_channels",
                    "untie_embeddings_and_output_weights", "vocab_size")
    for name in shape_fields:
        if name in saved and saved[name] != getattr(cfg.model, name):
            raise ConfigError(
                f"{flag}: the checkpoint has {name}={saved[name]} but this run has "
                f"{name}={getattr(cfg.model, name)}. Use the checkpoint's model flags or another {flag}."
            )
    saved_tp = state.get("config", {}).get("parallel", {}).get("tensor_model_parallel_size", 1)
    saved_padded = cfg.model.replace(
        make_vocab_size_divisible_by=saved.get("make_vocab_size_divisible_by", 128)).padded_vocab_size(saved_tp)
    padded = cfg.model.padded_vocab_size(cfg.parallel.tensor_model_parallel_size)
    if saved_padded != padded:
        raise ConfigError(
            f"{flag}: the checkpoint's embedding has {saved_padded} rows (vocab padded for TP {saved_tp}) "
            f"but this layout pads to {padded}. Keep --make-vocab-size-divisible-by x TP a multiple "
            "of the same value in both layouts (e.g. --make-vocab-size-divisible-by 1024)."
        )
