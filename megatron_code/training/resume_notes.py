"""What a resumed run does differently from the run that saved its checkpoint, said at once: a
changed flag's effect on the data stream or the learning rate otherwise shows only in a loss curve,
much later. Notes, not errors: changing the data mixture or the schedule mid-run can be intended."""
from __future__ import annotations

from megatron_code.training.config import OptimizerConfig, RunConfig, SchedulerConfig, from_saved
from megatron_code.training.lr_schedule import LearningRateSchedule

DATA_STREAM_FLAGS = (("training", "seed", "--seed"), ("data", "data_path", "--data-path"),
                     ("data", "split", "--split"), ("data", "seq_length", "--seq-length"))
"""(config section, field, flag) that decide which sample the data position points at."""


def resume_notes(saved: dict, cfg: RunConfig, iteration: int, consumed_samples: int) -> list[str]:
    """Lines for a full resume from the checkpoint whose train state is `saved`."""
    old = saved.get("config", {})
    notes = []
    batch = old.get("training", {}).get("global_batch_size")
    if batch not in (None, cfg.training.global_batch_size):
        notes.append(f"global batch size changed from {batch} (checkpoint) to {cfg.training.global_batch_size}: "
                     f"the data continues at sample {consumed_samples:,}")
    changed = [f"{flag} {old[section][name]} -> {getattr(getattr(cfg, section), name)}"
               for section, name, flag in DATA_STREAM_FLAGS
               if name in old.get(section, {}) and old[section][name] != getattr(getattr(cfg, section), name)]
    if changed:
        notes.append(f"data stream changed ({'; '.join(changed)}): the sample index is rebuilt and read from "
                     f"sample {consumed_samples:,} of the new one, so samples of the old stream may repeat or be "
                     "skipped")
    rate = _learning_rate_change(old, cfg, iteration + 1)
    if rate:
        notes.append(rate)
    return notes


def _learning_rate_change(old: dict, cfg: RunConfig, step: int) -> str | None:
    """The next step's rate under the checkpoint's schedule and under this run's, when they differ."""
    try:
        before = LearningRateSchedule(from_saved(SchedulerConfig, old.get("scheduler", {})),
                                      from_saved(OptimizerConfig, old.get("optimizer", {})),
                                      old["training"]["train_iters"])(step)
    except (KeyError, TypeError, ValueError):  # a checkpoint too old or foreign to rebuild: no note
        return None
    after = LearningRateSchedule(cfg.scheduler, cfg.optimizer, cfg.training.train_iters)(step)
    if abs(after - before) <= 1e-9 * max(abs(before), 1e-30):
        return None
    return (f"learning-rate schedule changed (--lr, --min-lr, --lr-*, or --train-iters with the default "
            f"--lr-decay-iters): step {step} runs at {after:.4g} where the checkpoint's run would use {before:.4g}")
