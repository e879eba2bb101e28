"""The planner's memory model (megatron_code.plan) applied to one resolved run, for the dry run:
what the fullest GPU of the job will hold, by component, against the usable memory of the
GPUs the planner knows, so that a layout that cannot fit is seen before the job is queued.
(Megatron-LM prints a theoretical memory report at startup for the same reason.)"""
from __future__ import annotations

import sys

from megatron_code.model.core_attention import packed_attention_kernel
from megatron_code.parallel.pipeline import WEIGHT_GRADS_THROUGH_AUTOGRAD
from megatron_code.parallel.state import virtual_stages
from megatron_code.plan.hardware import GPUS
from megatron_code.plan.layout import Layout
from megatron_code.plan.memory import Execution, MemoryEstimate
from megatron_code.plan.search import GIB, PlanRequest, layout_memory
from megatron_code.plan.timing import TimeModelConfig
from megatron_code.training.config import RunConfig

MODELED_SCHEDULES = ("1f1b", "interleaved-1f1b")


def run_layout(cfg: RunConfig, world_size: int) -> Layout:
    p, m = cfg.parallel, cfg.model
    tp, cp, pp = p.tensor_model_parallel_size, p.context_parallel_size, p.pipeline_model_parallel_size
    return Layout(tp=tp, pp=pp, vp=virtual_stages(p, m.num_layers), cp=cp, dp=world_size // (tp * cp * pp),
                  micro_batch_size=cfg.training.micro_batch_size, distributed_optimizer=p.use_distributed_optimizer,
                  recompute_granularity=m.recompute_granularity, recompute_method=m.recompute_method,
                  recompute_num_layers=m.recompute_num_layers, bf16_params=m.params_dtype == "bfloat16")


def document_attention(cfg: RunConfig) -> str | None:
    """The kernel packed documents run on without CP (None: none, or not the sdpa backend), as this
    process's torch would pick it on CUDA."""
    if not cfg.data.reset_attention_mask or cfg.model.attention_backend != "sdpa":
        return None
    return packed_attention_kernel("cuda")


def forecast(cfg: RunConfig, world_size: int) -> MemoryEstimate:
    """The planner's estimate of the fullest GPU of this run, as it runs on CUDA."""
    execution = Execution(bf16=cfg.training.bf16, fused_kernels=True,
                          fp32_residual=cfg.model.fp32_residual_connection,
                          # zero-bubble pipeline stages run without the fusion (parallel/pipeline.py)
                          step_weight_copies=(cfg.model.gradient_accumulation_fusion
                                              and (cfg.parallel.pipeline_model_parallel_size == 1
                                                   or cfg.parallel.pipeline_schedule in WEIGHT_GRADS_THROUGH_AUTOGRAD)),
                          document_attention=document_attention(cfg), fp8=cfg.model.fp8_format is not None)
    request = PlanRequest(model=cfg.model, gpus=world_size, gpu=GPUS["h100-sxm"], seq_length=cfg.data.seq_length,
                          global_batch_size=cfg.training.global_batch_size,
                          micro_batch_sizes=(cfg.training.micro_batch_size,), execution=execution,
                          training_mode=cfg.training.training_mode)
    precision = "fp8" if cfg.model.fp8_format else "bf16"
    return layout_memory(request, run_layout(cfg, world_size), TimeModelConfig(precision=precision))


def running_forecast(cfg: RunConfig, world_size: int, device_type: str) -> MemoryEstimate | None:
    """forecast() for a run that is starting or has run (the trainer's summary, the profiling
    report): None off CUDA (the model assumes the CUDA kernels; CPU memory is reported as RSS),
    and None with a warning if the model fails, which must never stop the run or lose its numbers."""
    if device_type != "cuda":
        return None
    try:
        return forecast(cfg, world_size)
    except Exception as exc:
        print(f"memory forecast (planner) unavailable for this run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def describe(memory: MemoryEstimate) -> str:
    """The fullest GPU's bytes by component, in GiB."""
    parts = [("weights", memory.weights), ("grads", memory.grads), ("optimizer", memory.optimizer),
             ("activations", memory.activations), ("DPO reference", memory.reference)]
    return (f"fullest GPU (pipeline rank {memory.pipeline_rank}): "
            + " + ".join(f"{name} {size / GIB:.1f}" for name, size in parts if size)
            + f" = {memory.total / GIB:.1f} GiB")


def fit_advice(world_size: int, seq_length: int) -> str:
    """What to change when the forecast does not fit (the dry run's line, the trainer's warning)."""
    return (f"--use-distributed-optimizer, --recompute-granularity, more TP/PP/CP; "
            f"`python -m megatron_code.plan --gpus {world_size} --seq-length {seq_length} "
            "--preset ...` lists the layouts that fit, fastest first")


def memory_forecast(cfg: RunConfig, world_size: int) -> list[str]:
    """Lines for the dry run: the fullest GPU's predicted bytes and which GPUs they fit."""
    memory = forecast(cfg, world_size)
    lines = [describe(memory)]
    fits = []
    for name, gpu in GPUS.items():
        budget = PlanRequest(model=cfg.model, gpus=1, gpu=gpu, seq_length=1, global_batch_size=1).memory_budget
        fits.append(f"{name} {'fits' if memory.total <= budget else 'DOES NOT FIT'} ({budget / GIB:.1f} usable)")
    lines.append("; ".join(fits))
    if any("DOES NOT FIT" in fit for fit in fits):
        lines.append(f"to fit: {fit_advice(world_size, cfg.data.seq_length)}")
    notes = ["bf16 autocast" if cfg.training.bf16 else "fp32", "the fused CUDA kernels"]
    if cfg.model.fp8_format:
        notes.append("FP8 activations counted as bf16")
    schedule = cfg.parallel.pipeline_schedule
    if cfg.parallel.pipeline_model_parallel_size > 1 and schedule not in MODELED_SCHEDULES:
        notes.append(f"{schedule}'s in-flight micro-batches taken as interleaved 1F1B's")
    lines.append(f"(as on CUDA: {', '.join(notes)}; docs/planner.md)")
    return lines
