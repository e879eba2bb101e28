"""Where training metrics go: a console line every log interval, one JSONL object per step,
TensorBoard scalars, and Weights & Biases (offline unless asked otherwise). Rank 0 only."""
from __future__ import annotations

import json
import os
import resource
import sys

import torch

from megatron_code.training.config import LoggingConfig
from megatron_code.training.straggler import format_straggler_line, straggler_scalars


def is_log_step(step: int, train_iters: int, log_interval: int) -> bool:
    """Whether step gets a console line (every log interval, and the last step)."""
    return step % log_interval == 0 or step == train_iters


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    def __init__(self, config: LoggingConfig, run_config_dict: dict, enabled: bool, save_dir: str | None,
                 resumed_at: int = 0):
        """resumed_at: the checkpoint's iteration when the run resumes (0: a fresh start). Steps
        after it that an earlier, crashed segment logged are logged again by this one."""
        self.config = config
        self.enabled = enabled
        self.jsonl = self.tensorboard = self.wandb_run = None
        if not enabled:
            return
        if config.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(config.metrics_file)), exist_ok=True)
            # Append: a resumed run continues the same file. Records of steps after the resume
            # point that follow the marker supersede earlier ones (the crashed segment's).
            self.jsonl = open(config.metrics_file, "a", buffering=1)
            if resumed_at:
                self.jsonl.write(json.dumps({"resumed_from_step": resumed_at}) + "\n")
        if config.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the crashed segment's events from resumed_at + 1 on, so the curves
            # do not fold back over themselves.
            self.tensorboard = SummaryWriter(log_dir=config.tensorboard_dir,
                                             purge_step=resumed_at + 1 if resumed_at else None)
        if config.wandb_project:
            self.wandb_run = _init_wandb(config, run_config_dict, save_dir)

    def log_step(self, metrics: dict) -> None:
        """metrics holds at least step, loss, lr, grad_norm, tokens_per_sec."""
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        scalars = {f"train/{key}": value for key, value in metrics.items()
                   if key != "step" and isinstance(value, (int, float))}
        scalars.update({f"train/phase_ms/{name}": ms for name, ms in metrics.get("phase_ms", {}).items()})
        if "straggler" in metrics:
            scalars.update(straggler_scalars(metrics["straggler"]))
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb_run:
            self.wandb_run.log(scalars, step=step)
        if is_log_step(step, metrics["train_iters"], self.config.log_interval):
            print(format_console_line(metrics), flush=True)
            if "straggler" in metrics:
                print(format_straggler_line(metrics["straggler"]), flush=True)

    def log_skipped(self, step: int, train_iters: int, consumed_samples: int) -> None:
        """A step of --skip-steps: its data was read and dropped, nothing was trained."""
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, "skipped": True, "consumed_samples": consumed_samples}) + "\n")
        print(f" step {step:6d}/{train_iters} | skipped (--skip-steps): its global batch was read and not trained on",
              flush=True)

    def log_memory(self, per_rank: list[dict]) -> None:
        """End of run: each rank's peak memory and parameter/gradient/optimizer bytes."""
        if not self.enabled:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps({"memory_per_rank": per_rank}) + "\n")
        worst = max(per_rank, key=lambda r: r["peak_mem_gib"])
        print(f" memory: peak {worst['peak_mem_gib']:.2f} GiB (rank {worst['rank']}); rank 0 holds params "
              f"{per_rank[0]['params'] / 2**20:.1f} MiB, grads {per_rank[0]['grads'] / 2**20:.1f} MiB, "
              f"optimizer state {per_rank[0]['optimizer'] / 2**20:.1f} MiB", flush=True)

    def log_validation(self, step: int, loss: float, perplexity: bool = True) -> None:
        """perplexity=False for losses that are not a token cross-entropy (DPO)."""
        if not self.enabled:
            return
        record = {"step": step, "valid_loss": loss, **({"valid_ppl": _perplexity(loss)} if perplexity else {})}
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self.tensorboard.add_scalar("valid/loss", loss, step)
        if self.wandb_run:
            self.wandb_run.log({"valid/loss": loss}, step=step)
        ppl = f" | ppl {record['valid_ppl']:.2f}" if perplexity else ""
        print(f" validation  step {step:6d} | loss {loss:.4f}{ppl}", flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb_run:
            self.wandb_run.finish()


def _perplexity(loss: float) -> float:
    return float(torch.tensor(min(loss, 50.0)).exp())


def format_console_line(m: dict) -> str:
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    return (
        f" step {m['step']:6d}/{m['train_iters']} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | "
        f"grad norm {m['grad_norm']:.3f} | {m['tokens_per_sec']:,.0f} tok/s | "
        f"{m['ms_per_step']:.0f} ms/step | {m['tflops_per_device']:.2f} TFLOP/s/dev | MFU {mfu} | "
        f"mem {m['peak_mem_gib']:.2f} GiB"
        + (f" | reward acc {m['reward_accuracy']:.3f} margin {m['reward_margin']:.4f}" if "reward_margin" in m else "")
    )


def _init_wandb(config: LoggingConfig, run_config_dict: dict, save_dir: str | None):
    # Offline by default: runs on clusters without internet and nothing is uploaded unasked.
    os.environ.setdefault("WANDB_MODE", config.wandb_mode)
    import wandb

    directory = config.wandb_save_dir or os.path.join(save_dir or os.getcwd(), "wandb")
    os.makedirs(directory, exist_ok=True)
    return wandb.init(
        project=config.wandb_project, name=config.wandb_exp_name, dir=directory, config=run_config_dict,
    )


def print_rank0(*args, enabled: bool = True) -> None:
    if enabled:
        print(*args, file=sys.stdout, flush=True)
