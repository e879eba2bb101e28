"""`mcode-train --dry-run`: resolve and validate the config exactly as a real run on the planned
world would (validate_job), then print it with the rank layout and the process groups. Nothing
is started: no torch.distributed, no GPU, no file written; data files may be missing."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import yaml

from megatron_code.parallel.rank_layout import format_groups, format_rank_table
from megatron_code.parallel.state import rank_grid
from megatron_code.training.checkpointing import latest_iteration
from megatron_code.training.config import CheckpointConfig, RunConfig
from megatron_code.training.data import pretraining_prefixes
from megatron_code.training.finetune_status import finetune_file_status, reference_status
from megatron_code.training.memory_forecast import memory_forecast
from megatron_code.training.validate import data_files_exist, validate_job
from megatron_code.training.world import JobWorld, planned_world


def dry_run_report(cfg: RunConfig, environ: Mapping[str, str] = os.environ) -> str:
    """Validate cfg for the planned world (raises ConfigError like a real run) and describe it."""
    world = planned_world(cfg.launch, environ)
    tokenizer = validate_job(cfg, world.world_size, require_files=False)
    grid = rank_grid(cfg.parallel, world.world_size)
    return "\n".join([
        "== mcode-train --dry-run: nothing started (no torch.distributed, no GPU, no files written) ==",
        *_summary(cfg, world),
        "",
        "== memory per GPU (the planner's model of this run; GiB) ==",
        *memory_forecast(cfg, world.world_size),
        "",
        "== files (a dry run does not need them; those present were checked) ==",
        *_file_status(cfg, tokenizer is not None),
        "",
        "== resolved config (defaults < --preset < --config < flags; derived values filled in) ==",
        yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).rstrip(),
        "",
        f"== rank layout: {world.world_size} ranks, node = rank // {world.nproc_per_node}, "
        f"local = rank % {world.nproc_per_node} ==",
        *format_rank_table(grid, world.nproc_per_node),
        "",
        "== process groups ==",
        *format_groups(grid, world.nproc_per_node),
    ])


def _summary(cfg: RunConfig, world: JobWorld) -> list[str]:
    p, t = cfg.parallel, cfg.training
    tp, cp, pp = p.tensor_model_parallel_size, p.context_parallel_size, p.pipeline_model_parallel_size
    dp = world.world_size // (tp * cp * pp)
    extras = [name for name, on in (("sequence parallel", p.sequence_parallel),
                                    (f"distributed optimizer over {dp * cp} ranks", p.use_distributed_optimizer))
              if on]
    accumulation = t.global_batch_size // (t.micro_batch_size * dp)
    dpo = t.training_mode == "dpo"
    sequences = 2 if dpo else 1
    kind = "sequences (DPO: a sample is a chosen + rejected pair)" if dpo else "samples"
    return [
        f"world: {world.world_size} processes = {world.nnodes} nodes x {world.nproc_per_node} per node "
        f"({world.source})",
        f"layout: TP {tp} x CP {cp} x PP {pp} x DP {dp}" + "".join(f", {e}" for e in extras),
        f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x {accumulation} accumulation "
        f"steps x {dp} data-parallel ranks; {t.global_batch_size * sequences * cfg.data.seq_length:,} tokens "
        f"per step of {cfg.data.seq_length:,}-token {kind}; {t.train_iters:,} steps",
        f"model: {cfg.model.num_parameters(tp) / 1e9:.3f}B parameters, {cfg.model.num_layers} layers, "
        f"vocab {cfg.model.vocab_size:,} padded to {cfg.model.padded_vocab_size(tp):,}",
    ]


def _file_status(cfg: RunConfig, tokenizer_found: bool) -> list[str]:
    d, ck = cfg.data, cfg.checkpoint
    if tokenizer_found:
        tokenizer = (f"{d.tokenizer_model}: found, {cfg.model.vocab_size:,} tokens" if d.tokenizer_model
                     else f"none: {cfg.model.vocab_size:,} tokens from --vocab-size")
    else:
        tokenizer = f"{d.tokenizer_model}: MISSING, vocabulary size from --vocab-size"
    lines = [f"tokenizer  {tokenizer}"]
    mode = cfg.training.training_mode
    if d.mock_data:
        lines.append("data       --mock-data (synthetic " + ("tokens)" if mode == "pretrain" else "conversations)"))
    labels = {"--data-path": "data      ", "--valid-data-path": "valid data"}
    for flag, prefixes in ({} if d.mock_data or mode != "pretrain" else pretraining_prefixes(d)).items():
        for prefix in prefixes:
            state = ("found, token ids checked against the vocabulary" if data_files_exist(prefix)
                     else "MISSING .bin/.idx, not checked (a real run refuses to start)")
            lines.append(f"{labels[flag]} {prefix}: {state}")
    if mode != "pretrain":
        lines += finetune_file_status(cfg)
    lines.append(f"load       {_load_status(ck)}")
    if mode == "dpo":
        lines.append(f"reference  {reference_status(ck)}")
    lines.append(f"save       {ck.save or 'none: nothing will be saved'}")
    return lines


def _load_status(ck: CheckpointConfig) -> str:
    if not ck.load:
        return "none: starts from scratch"
    latest = latest_iteration(ck.load)
    if ck.finetune and latest is None:
        return f"{ck.load}: MISSING checkpoint (a real run with --finetune refuses to start)"
    if ck.finetune:
        return f"{ck.load}: --finetune from iteration {latest} (weights only, step 0, fresh optimizer)"
    if latest is None:
        return f"{ck.load}: no checkpoint yet, starts from scratch"
    return f"{ck.load}: resumes at iteration {latest} (model, optimizer, RNG, data position)"
