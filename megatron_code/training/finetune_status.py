"""What a dry run reports about the SFT/DPO inputs: the export's files and DPO's reference."""
from __future__ import annotations

from megatron_code.training.checkpointing import latest_iteration
from megatron_code.training.config import CheckpointConfig, RunConfig
from megatron_code.training.conversations import FIELDS, FLAGS, field_path, files_exist
from megatron_code.training.finetune_data import mode_blend


def finetune_file_status(cfg: RunConfig) -> list[str]:
    """One line per export prefix of --sft-data-path / --dpo-data-path."""
    mode = cfg.training.training_mode
    if cfg.data.mock_data:
        return []  # the dry run's data line says --mock-data
    lines = []
    for prefix in mode_blend(cfg)[0]:
        datasets = ", ".join(field_path(prefix, f).rsplit("/", 1)[-1] for f in FIELDS[mode])
        state = ("found; alignment and token ids checked when the tokenizer is present" if files_exist(prefix, mode)
                 else "MISSING .bin/.idx, not checked (a real run refuses to start)")
        lines.append(f"{mode} data   {prefix} ({FLAGS[mode]}: {datasets}): {state}")
    return lines


def reference_status(ck: CheckpointConfig) -> str:
    """Where DPO's frozen reference model comes from."""
    root = ck.ref_load or ck.load
    if not root:  # validation allows this with --mock-data only
        return "the policy's initial weights (--mock-data, no checkpoint), frozen"
    source = "--ref-load" if ck.ref_load else "--load"
    latest = latest_iteration(root) if root else None
    if latest is None:
        return f"{root} ({source}): MISSING checkpoint (a real run refuses to start)"
    return f"{root} ({source}): iteration {latest}, frozen"
