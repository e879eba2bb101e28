"""Per-GPU memory of a layout, as OUR trainer holds it: fp32 parameters (the master weights; bf16
is autocast), fp32 gradients, fp32 Adam state (sharded over DP x CP by the distributed optimizer),
and the activations of the micro-batches a pipeline rank has in flight (activations.py).
docs/planner.md derives every term; benchmarks/bench_plan_memory.py measures them."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable

from megatron_code.model.config import ModelConfig
from megatron_code.model.fp8 import fp8_layer_indices
from megatron_code.parallel.pipeline import local_stage_ids
from megatron_code.plan import activations as act
from megatron_code.plan.layout import Layout

FP32 = 4
BF16 = 2


@dataclass(frozen=True)
class LayerParameters:
    """Parameters of one transformer layer on one TP rank."""

    total: int
    """All of them."""
    gemm: int
    """Weights F.linear multiplies by: autocast keeps a bf16 copy of each for backward."""
    cached: int
    """Those of `gemm` autocast caches for the whole forward (leaf weights, not views; the MLP's
    gate/up weights are views of one tensor and are cast per use)."""


@dataclass(frozen=True)
class Execution:
    """How the step computes, as far as memory goes."""

    bf16: bool = True
    """bf16 autocast over fp32 master weights (else fp32 throughout)."""
    fused_kernels: bool = True
    """The kernels `auto` picks on CUDA (Triton RMSNorm/SwiGLU, fused linear-cross-entropy), else
    the plain-torch reference kernels (CPU)."""
    fp32_residual: bool = False
    """--fp32-residual-connection: the residual stream in fp32 under bf16 (else in bf16)."""
    step_weight_copies: bool = True
    """--gradient-accumulation-fusion (the default): one bf16 copy of every layer weight, made by
    the first micro-batch and held for the whole forward-backward of the step, instead of
    autocast's copies per micro-batch in flight (and per recomputed layer)."""
    document_attention: str | None = None
    """Packed documents (--reset-attention-mask) on the sdpa backend: the kernel that runs them
    (varlen, varlen-repeat-kv, mask: activations.document_mask_bytes); None: none or another backend."""
    fp8: bool = False
    """FP8 linears (torch backend) in the layers ModelConfig does not keep in bf16
    (num_layers_at_start/end_in_bf16): smaller saved inputs (activations.MicroBatch.fp8), and each
    weight cast to FP8 with its transpose (2 bytes per element, also without bf16 autocast)."""


def layer_parameter_sizes(config: ModelConfig, tp: int) -> list[int]:
    """Elements of one layer's parameters on one TP rank, in definition order: input norm, QKV,
    output projection, MLP norm, gate/up, down."""
    h, d, f = config.hidden_size, config.head_dim, config.ffn_hidden_size // tp
    nq, nkv = config.num_attention_heads // tp, config.num_kv_heads // tp
    return [h, (nq + 2 * nkv) * d * h, nq * d * h, h, 2 * f * h, f * h]


def layer_parameters(config: ModelConfig, tp: int) -> LayerParameters:
    norm, qkv, proj, _, gate_up, down = layer_parameter_sizes(config, tp)
    return LayerParameters(total=qkv + proj + gate_up + down + 2 * norm, gemm=qkv + proj + gate_up + down,
                           cached=qkv + proj + down)


def rank_parameters(config: ModelConfig, tp: int, layers: int, first: bool, last: bool, padded_vocab: int) -> int:
    """Parameters of a rank holding `layers` layers, the embedding if `first`, and the final norm
    and (untied) output layer if `last`."""
    embedding = padded_vocab // tp * config.hidden_size
    total = layers * layer_parameters(config, tp).total + embedding * first
    if last:
        total += config.hidden_size + embedding * config.untie_embeddings_and_output_weights
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the fullest GPU of a layout."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    """Peak activation bytes (in-flight micro-batches plus the largest transient)."""
    pipeline_rank: int
    """Which pipeline rank this is (ranks differ: embedding, output layer, in-flight micro-batches)."""
    in_flight: int
    """Micro-batches (chunk micro-batches under interleaving) whose activations that rank holds."""
    reference: int = 0
    """DPO: the frozen reference model's weights (reference_weight_bytes); 0 otherwise."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.reference


def in_flight_micro_batches(layout: Layout, micro_batches: int, pp_rank: int) -> int:
    """Chunk micro-batches a pipeline rank holds at its peak under torch.distributed.pipelining:
    1F1B runs min(m, PP - r) forwards before its first backward; interleaved 1F1B (torch's
    _get_warmup_ops) runs (VP - 1) x (micro-batches per round) + 2 (PP - 1 - r) warmup forwards
    and one more before each backward. For rank 0 that is VP PP (1 + (PP - 1) / (PP VP)), the
    Korthikanti et al. factor, in units of one chunk's activations."""
    pp, vp, m = layout.pp, layout.vp, micro_batches
    if pp == 1:
        return 1
    if vp == 1:
        return min(m, pp - pp_rank)
    per_round = m // max(1, m // pp)
    warmup = min((vp - 1) * per_round + 2 * (pp - 1 - pp_rank), m * vp)
    return min(warmup + 1, m * vp)


def recompute_split(layout: Layout, layers: int) -> tuple[int, int, int]:
    """(layers storing everything, checkpointed groups storing only their input, layers rebuilt at
    once in backward) for one chunk of `layers` layers (TransformerBlock.layer_groups' rules)."""
    k = layout.recompute_num_layers or 0
    if layout.recompute_method == "uniform":
        return 0, math.ceil(layers / k), min(k, layers)
    if layout.recompute_method == "block":
        recomputed = min(k, layers)
        return layers - recomputed, recomputed, 1 if recomputed else 0
    return layers, 0, 0


def micro_batch(layout: Layout, seq_length: int, execution: Execution) -> act.MicroBatch:
    return act.MicroBatch(layout.micro_batch_size, seq_length, layout.tp, layout.cp, layout.sequence_parallel,
                          execution.bf16, execution.fused_kernels, execution.fp32_residual,
                          step_output_weight=execution.step_weight_copies and execution.bf16 and execution.fused_kernels,
                          document_attention=execution.document_attention)


def pipeline_buffer_bytes(config: ModelConfig, layout: Layout, mb: act.MicroBatch, micro_batches: int,
                          pp_rank: int) -> int:
    """torch.distributed.pipelining allocates, once per stage and micro-batch, a receive buffer for
    the stage input (hidden [s/(CP TP), b, h] fp32, int64 position and segment ids; not on the
    first stage) and one for its output's gradient (not on the last stage), and keeps them."""
    if layout.pp == 1:
        return 0
    hidden = act.layer_input_bytes(config, mb)
    ids = 8 * (mb.tokens + mb.micro_batch_size * mb.seq_length)
    stages = layout.pp * layout.vp
    local = local_stage_ids(layout.schedule, layout.pp, layout.vp, pp_rank)
    return micro_batches * sum((stage > 0) * (hidden + ids) + (stage < stages - 1) * hidden for stage in local)


def rank_chunks(config: ModelConfig, layout: Layout, pp_rank: int) -> list[range]:
    """Global indices of the layers of each chunk (stage) a pipeline rank holds."""
    chunk_layers = config.num_layers // (layout.pp * layout.vp)
    return [range(stage * chunk_layers, (stage + 1) * chunk_layers)
            for stage in local_stage_ids(layout.schedule, layout.pp, layout.vp, pp_rank)]


def fp8_layers(config: ModelConfig, execution: Execution) -> range:
    """Global indices of the layers whose linears run in FP8 (none without Execution.fp8)."""
    return fp8_layer_indices(config) if execution.fp8 else range(0)


def weight_copy_bytes(execution: Execution, fp8_layer: bool, bf16_params: bool = False) -> int:
    """Bytes per GEMM weight element of a layer's low-precision weights: FP8 casts with their
    transposes in an FP8 layer, bf16 copies under autocast (none of bf16 parameters), none in fp32."""
    if fp8_layer:
        return BF16
    return BF16 if execution.bf16 and not bf16_params else 0


def layer_memory(config: ModelConfig, mb: act.MicroBatch, execution: Execution, selective: bool,
                 per_layer_copies: bool, bf16_params: bool = False) -> Callable[[int], int]:
    """bytes(layer index): what one stored layer keeps, with its weight copies when they are made
    per micro-batch (no step weight copies)."""
    in_fp8 = fp8_layers(config, execution)
    gemm = layer_parameters(config, mb.tensor_parallel).gemm

    @functools.cache  # the search asks for every layer of thousands of layouts; there are two kinds
    def bytes_of_kind(fp8: bool) -> int:
        copies = weight_copy_bytes(execution, fp8, bf16_params) * gemm if per_layer_copies else 0
        return act.layer_bytes(config, dataclasses.replace(mb, fp8=fp8), recompute_core=selective) + copies
    return lambda index: bytes_of_kind(index in in_fp8)


def rank_activations(config: ModelConfig, layout: Layout, seq_length: int, micro_batches: int, pp_rank: int,
                     padded_vocab: int, execution: Execution) -> tuple[int, int]:
    """(peak activation bytes, in-flight chunk micro-batches) of one pipeline rank. Where its chunks
    differ (FP8 and bf16 layers), each in-flight micro-batch is counted as the largest."""
    mb = micro_batch(layout, seq_length, execution)
    chunks = rank_chunks(config, layout, pp_rank)
    chunk_layers = len(chunks[0])
    full, groups, rebuilt = recompute_split(layout, chunk_layers)
    per_layer = layer_parameters(config, layout.tp)
    in_fp8 = fp8_layers(config, execution)
    # Per-step copies of all this rank's layers, or autocast's, kept per stored layer and in flight.
    step_copies = 0
    if execution.step_weight_copies:
        step_copies = sum(weight_copy_bytes(execution, i in in_fp8, layout.bf16_params) * per_layer.gemm
                          for c in chunks for i in c)
    holds_last = pp_rank == layout.pp - 1
    if holds_last and mb.step_output_weight and not layout.bf16_params:  # the fused head's per-step bf16 weight
        step_copies += BF16 * padded_vocab // layout.tp * config.hidden_size
    copy = 0 if execution.step_weight_copies or layout.bf16_params else BF16 * execution.bf16
    stored_layer = layer_memory(config, mb, execution, layout.recompute_granularity == "selective",
                                per_layer_copies=not execution.step_weight_copies, bf16_params=layout.bf16_params)
    # Block recompute rebuilds a chunk's first layers and stores the last `full` ones.
    full_layer = max(stored_layer(i) for c in chunks for i in c)
    chunk = (max(sum(stored_layer(i) for i in c[chunk_layers - full:]) for c in chunks)
             + groups * act.layer_input_bytes(config, mb) + act.rope_table_bytes(config, mb))
    in_flight = in_flight_micro_batches(layout, micro_batches, pp_rank)
    stored = in_flight * chunk + pipeline_buffer_bytes(config, layout, mb, micro_batches, pp_rank) + step_copies
    if layout.pp > 1:  # the schedule keeps each in-flight chunk's output (sent on) until its backward
        stored += (in_flight - holds_last) * act.layer_input_bytes(config, mb)
    # At the end of a forward, autocast's cache still holds the bf16 copies of the recomputed
    # layers' weights (those of the other layers are already counted: backward keeps them).
    forward_end = stored + copy * per_layer.cached * (chunk_layers - full)
    if holds_last:  # the output layer and the loss
        # The unfused head's F.linear keeps autocast's bf16 copy of the output weight; the fused
        # head reads the per-step copy (above) or, without it, casts it inside the loss and recasts
        # in backward (counted in its transient).
        output_weight = 0 if execution.fused_kernels else BF16 * execution.bf16 * padded_vocab // layout.tp * config.hidden_size
        loss_forward = act.output_bytes(config, mb, padded_vocab) + act.loss_transient_bytes(config, mb, padded_vocab)
        forward_end += output_weight + max(loss_forward, act.loss_backward_bytes(config, mb, padded_vocab))
    # The layers' backward runs after the output layer's, whose tensors are freed by then; when
    # a chunk's first layers are rebuilt (block method), its stored later layers are freed too.
    backward = stored + max(0, rebuilt - full) * full_layer + act.backward_workspace_bytes(config, mb)
    return max(forward_end, backward), in_flight


def rank_memory(config: ModelConfig, layout: Layout, seq_length: int, global_batch_size: int, pp_rank: int,
                padded_vocab: int, execution: Execution) -> MemoryEstimate:
    """Memory of one pipeline rank (all its TP/CP/DP peers hold the same)."""
    layers = config.num_layers // layout.pp
    params = rank_parameters(config, layout.tp, layers, pp_rank == 0, pp_rank == layout.pp - 1, padded_vocab)
    shards = layout.dp * layout.cp if layout.distributed_optimizer else 1
    grads = FP32 * params  # ZeRO-1 reduce-scatters in place: the reduced shard is part of the buffer
    # bf16 parameters: their fp32 master weights are sharded optimizer state (Megatron-LM's layout)
    weights, optimizer = (BF16 * params, 3 * FP32 * params // shards) if layout.bf16_params else (
        FP32 * params, 2 * FP32 * params // shards)
    activations, in_flight = rank_activations(config, layout, seq_length, layout.micro_batches(global_batch_size),
                                              pp_rank, padded_vocab, execution)
    # Both reducers sum the gradient buffers in place (no copies at the end of the backward).
    return MemoryEstimate(weights=weights, grads=grads, optimizer=optimizer,
                          activations=activations, pipeline_rank=pp_rank, in_flight=in_flight)


def estimate_memory(config: ModelConfig, layout: Layout, seq_length: int, global_batch_size: int,
                    padded_vocab: int, execution: Execution = Execution()) -> MemoryEstimate:
    """The fullest pipeline rank's memory."""
    ranks = [rank_memory(config, layout, seq_length, global_batch_size, r, padded_vocab, execution)
             for r in range(layout.pp)]
    return max(ranks, key=lambda estimate: estimate.total)


def reference_weight_bytes(config: ModelConfig, tp: int, padded_vocab: int, bf16_weights: bool,
                           fp32_embedding: bool = False) -> int:
    """DPO's frozen reference on one TP rank (DPO runs without PP): a second copy of the weights,
    without gradients or optimizer state. Under bf16 without FP8 the trainer keeps its GEMM weights
    and embedding table in bf16, the norm weights (and, with an fp32 residual stream, the
    embedding table) in fp32 (DPOTrainer._freeze); else everything in fp32."""
    params = rank_parameters(config, tp, config.num_layers, True, True, padded_vocab)
    if not bf16_weights:
        return FP32 * params
    fp32 = (2 * config.num_layers + 1) * config.hidden_size  # the norm weights
    fp32 += padded_vocab // tp * config.hidden_size if fp32_embedding else 0
    return BF16 * (params - fp32) + FP32 * fp32
