"""Enumerate the layouts the trainer accepts, keep those that fit in memory, rank them by
predicted step time. For each parallel shape the cheapest recompute that fits is kept."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

from megatron_code.errors import ConfigError
from megatron_code.model.config import ModelConfig
from megatron_code.plan.hardware import GpuSpec
from megatron_code.plan.layout import Layout, check_layout
from megatron_code.plan.memory import Execution, MemoryEstimate, estimate_memory, reference_weight_bytes
from megatron_code.plan.timing import (
    TimeEstimate, TimeModelConfig, estimate_time, model_flops_per_step, reference_forward_seconds,
)
from megatron_code.training.flops import REFERENCE_FLOPS_SHARE

GIB = 2**30


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for."""

    model: ModelConfig
    """The model (vocab_size set)."""
    gpus: int
    """Number of GPUs of the job."""
    gpu: GpuSpec
    """The accelerator and its links."""
    seq_length: int
    """Tokens per sample."""
    global_batch_size: int
    """Samples per optimizer step."""
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    """Micro-batch sizes to try."""
    max_virtual_stages: int = 8
    """Largest interleaving (virtual stages per pipeline rank) to try."""
    min_tokens_per_cp_rank: int = 1024
    """Smallest s / CP worth trying (shorter shards leave the GEMMs too small)."""
    usable_memory_fraction: float = 0.92
    """Share of HBM the tensors may take (the caching allocator's fragmentation takes the rest)."""
    reserved_gib: float = 2.5
    """Memory the tensors never get: CUDA context, NCCL buffers, cuBLAS workspaces."""
    execution: Execution = field(default_factory=Execution)
    """bf16 autocast and the fused CUDA kernels (what the trainer runs on GPUs)."""
    training_mode: str = "pretrain"
    """pretrain and sft plan alike; dpo: a sample (and the batch sizes) counts preference pairs of
    two sequences, the layout is TP x DP only (the trainer refuses PP and CP for DPO), and the
    frozen reference model's weights and forward passes are added."""

    @property
    def memory_budget(self) -> float:
        return self.gpu.memory_gb * 1e9 * self.usable_memory_fraction - self.reserved_gib * GIB

    @property
    def sequences_per_sample(self) -> int:
        return 2 if self.training_mode == "dpo" else 1


@dataclass(frozen=True)
class Candidate:
    """A layout that fits, with its predictions."""

    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    tokens_per_s_per_gpu: float
    mfu: float
    """Model FLOPs (Megatron's count, no recompute) per second over the GPUs' dense peak."""


def _powers_of_two(limit: int) -> Iterator[int]:
    value = 1
    while value <= limit:
        yield value
        value *= 2


def parallel_shapes(request: PlanRequest) -> Iterator[tuple[int, int, int, int, int]]:
    """(TP, PP, VP, CP, DP) whose product is the GPU count; TP within a node, PP dividing the layers."""
    layers, n = request.model.num_layers, request.gpus
    dpo = request.training_mode == "dpo"  # TP x DP only
    for tp in _powers_of_two(min(request.gpu.gpus_per_node, n)):
        for cp in _powers_of_two(1 if dpo else n // tp):
            if request.seq_length // cp < request.min_tokens_per_cp_rank:
                break
            pipelines = range(1, 1 + (1 if dpo else layers))
            for pp in (p for p in pipelines if layers % p == 0 and n % (tp * cp * p) == 0):
                virtual = [1] + [v for v in range(2, request.max_virtual_stages + 1) if pp > 1 and layers % (pp * v) == 0]
                for vp in virtual:
                    yield tp, pp, vp, cp, n // (tp * cp * pp)


def recompute_options(request: PlanRequest, tp: int, pp: int, vp: int) -> Iterator[dict]:
    """None, selective, then full recompute of the first k layers of each stage (block), k = 1..all
    (k = all is written as uniform with groups of one layer, the same thing)."""
    yield {}
    yield dict(recompute_granularity="selective")
    chunk_layers = request.model.num_layers // (pp * vp)
    for k in range(1, chunk_layers):
        yield dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=k)
    yield dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def _in_sequences(request: PlanRequest, layout: Layout) -> tuple[Layout, int]:
    """(layout, global batch) counted in sequences: a DPO micro-batch of b pairs runs 2b sequences."""
    k = request.sequences_per_sample
    return dataclasses.replace(layout, micro_batch_size=k * layout.micro_batch_size), k * request.global_batch_size


def layout_memory(request: PlanRequest, layout: Layout, tm: TimeModelConfig) -> MemoryEstimate:
    model = layout.model_config(request.model)
    vocab = model.padded_vocab_size(layout.tp)
    sequences, batch = _in_sequences(request, layout)
    memory = estimate_memory(model, sequences, request.seq_length, batch, vocab, request.execution)
    if request.training_mode != "dpo":
        return memory
    bf16_weights = request.execution.bf16 and tm.precision != "fp8"
    return dataclasses.replace(memory, reference=reference_weight_bytes(
        model, layout.tp, vocab, bf16_weights, fp32_embedding=request.execution.fp32_residual))


def evaluate(request: PlanRequest, layout: Layout, tm: TimeModelConfig) -> Candidate:
    if request.training_mode == "dpo":  # per-token log-probs: the fused head recomputes its logits
        tm = dataclasses.replace(tm, loss_head_recompute=True)
    model = layout.model_config(request.model)
    vocab = model.padded_vocab_size(layout.tp)
    sequences, batch = _in_sequences(request, layout)
    memory = layout_memory(request, layout, tm)
    time = estimate_time(model, sequences, request.seq_length, batch, vocab, request.gpu, tm,
                         request.execution.document_attention)
    flops = model_flops_per_step(request.model, request.seq_length, batch, vocab)
    if request.training_mode == "dpo":  # + the reference's forward passes, counted as the trainer does
        time = dataclasses.replace(time, reference=reference_forward_seconds(
            request.model, sequences, request.seq_length, batch, vocab, request.gpu, tm))
        flops *= 1 + REFERENCE_FLOPS_SHARE
    tokens = batch * request.seq_length
    peak = request.gpu.peak_tflops(tm.precision) * 1e12
    return Candidate(layout, memory, time, tokens / time.step / request.gpus, flops / time.step / request.gpus / peak)


def best_recompute(request: PlanRequest, base: Layout, tm: TimeModelConfig) -> Candidate | None:
    """The fastest fitting recompute choice for one valid parallel layout (None: nothing fits).
    Recomputing more only adds time, so the search stops at no recompute if that fits, and at the
    first (smallest) block size that fits."""
    fitting = []
    for option in recompute_options(request, base.tp, base.pp, base.vp):
        layout = dataclasses.replace(base, **option)
        if layout_memory(request, layout, tm).total <= request.memory_budget:
            fitting.append(evaluate(request, layout, tm))
            if layout.recompute_granularity in (None, "full"):  # nothing cheaper is left to try
                break
    best = min(fitting, key=lambda c: c.time.step, default=None)
    if best is not None:  # the recompute flags pass the trainer's checks too
        check_layout(best.layout, request.model, request.seq_length, request.global_batch_size)
    return best


@dataclass
class PlanResult:
    """Ranked candidates and how many layouts were looked at."""

    candidates: list[Candidate]
    parallel_layouts: int = 0
    """(TP, PP, VP, CP, DP, micro-batch, ZeRO-1) combinations tried."""
    valid: int = 0
    """Of those, the ones the trainer accepts."""
    refusals: dict[str, str] = dataclasses.field(default_factory=dict)
    """The trainer's reason for each refused layout, keyed by `Layout.label`."""


def plan(request: PlanRequest, tm: TimeModelConfig = TimeModelConfig()) -> PlanResult:
    """Every valid layout that fits, fastest first."""
    result = PlanResult(candidates=[])
    for tp, pp, vp, cp, dp in parallel_shapes(request):
        for micro_batch in request.micro_batch_sizes:
            for zero1 in (True, False):
                # ZeRO-1 under bf16 runs bf16 parameters (sharded fp32 master weights): never worse
                base = Layout(tp, pp, vp, cp, dp, micro_batch, zero1, bf16_params=zero1 and request.execution.bf16)
                result.parallel_layouts += 1
                try:
                    check_layout(base, request.model, request.seq_length, request.global_batch_size)
                except ConfigError as refusal:
                    result.refusals[base.label] = str(refusal)
                    continue
                result.valid += 1
                best = best_recompute(request, base, tm)
                if best is not None:
                    result.candidates.append(best)
    result.candidates.sort(key=lambda c: (c.time.step, c.memory.total))
    return result


def nearest_valid_batch(request: PlanRequest) -> tuple[int, Layout] | None:
    """The global batch size nearest the requested one that the trainer accepts with some searched
    layout (ZeRO-1, no recompute), and that layout; None if none does."""
    best: tuple[int, Layout] | None = None
    for tp, pp, vp, cp, dp in parallel_shapes(request):
        for micro_batch in request.micro_batch_sizes:
            step = micro_batch * dp
            batch = max(1, round(request.global_batch_size / step)) * step
            layout = Layout(tp, pp, vp, cp, dp, micro_batch, True, bf16_params=request.execution.bf16)
            if best is not None and abs(batch - request.global_batch_size) >= abs(best[0] - request.global_batch_size):
                continue
            try:
                check_layout(layout, request.model, request.seq_length, batch)
            except ConfigError:
                continue
            best = (batch, layout)
    return best
