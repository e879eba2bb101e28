"""Activation bytes of our decoder for one micro-batch on one rank, term by term.

Each term is a tensor autograd keeps for backward in OUR implementation (model/*.py, kernels/*,
torch SDPA), for either kernel path: the fused one `auto` picks on CUDA (Triton RMSNorm and
SwiGLU, the chunked linear-cross-entropy loss head) or the plain-torch reference (CPU).
docs/planner.md derives them in the style of Korthikanti et al. (2022); tests/test_plan.py checks
the reference sums against the bytes autograd really saves and benchmarks/bench_plan_gpu.py the
fused ones on a GPU. Notation:
T local tokens (b s / CP), h hidden, d head dim, nq/nkv local query/KV heads (/ TP), f local FFN
width (/ TP), a bytes of a compute-dtype element (2 under bf16 autocast, 4 in fp32).
"""
from __future__ import annotations

from dataclasses import dataclass

from kernels.linear_cross_entropy import default_blocking
from megatron_code.model.config import ModelConfig

FP32 = 4


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as one rank holds it."""

    micro_batch_size: int
    """Samples per micro-batch (b)."""
    seq_length: int
    """Tokens per sample (s), before context parallelism splits them."""
    tensor_parallel: int = 1
    """TP size: heads, FFN columns and vocabulary are split this many ways."""
    context_parallel: int = 1
    """CP size: each rank holds s / CP tokens of every sample, but the whole sequence's keys/values."""
    sequence_parallel: bool = False
    """Norm/residual tensors are split over TP along the sequence."""
    bf16: bool = True
    """bf16 autocast (GEMM inputs/outputs 2 bytes) rather than fp32."""
    fused_kernels: bool = True
    """Triton RMSNorm/SwiGLU and the fused linear-cross-entropy loss head (`auto` on CUDA), rather
    than the plain-torch reference kernels (CPU)."""
    fp32_residual: bool = False
    """--fp32-residual-connection: the residual stream (norm inputs, layer inputs, their
    gradients) in fp32 under bf16; by default it has the compute dtype."""
    step_output_weight: bool = False
    """--gradient-accumulation-fusion with the fused head under bf16: the head reads the output
    weight's per-step bf16 copy (counted with the step's weight copies, not here) and adds its
    gradient into .grad itself (no fp32 gradient temporary)."""
    cp_mask_element_bytes: int | None = None
    """Bytes per element of the attention masks SDPA keeps under context parallelism off CUDA
    (torch converts bool masks to the query dtype; None: that dtype)."""
    fp8: bool = False
    """This layer's linears run in FP8 (the torch backend, with its default fused SwiGLU): each
    keeps its input as the FP8 transpose its weight gradient reads (one byte per element), not in
    the compute dtype, and the SwiGLU keeps gate_up in the compute dtype (kernels/fp8_mlp.py)."""
    document_attention: str | None = None
    """Packed documents (--reset-attention-mask) on the sdpa backend: the kernel that runs them
    without CP (model/core_attention.py packed_attention_kernel: varlen, varlen-repeat-kv, mask;
    under CP always the mask); None: no packed documents, or another backend. See document_mask_bytes."""

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_length // self.context_parallel

    @property
    def norm_tokens(self) -> int:
        """Tokens of the norm/residual region on this rank (split over TP under SP)."""
        return self.tokens // self.tensor_parallel if self.sequence_parallel else self.tokens

    @property
    def compute_bytes(self) -> int:
        return 2 if self.bf16 else FP32

    @property
    def residual_bytes(self) -> int:
        return FP32 if self.fp32_residual else self.compute_bytes


def _local(config: ModelConfig, mb: MicroBatch) -> tuple[int, int, int, int, int]:
    tp = mb.tensor_parallel
    return (config.hidden_size, config.head_dim, config.num_attention_heads // tp,
            config.num_kv_heads // tp, config.ffn_hidden_size // tp)


def norm_bytes(config: ModelConfig, mb: MicroBatch) -> int:
    """One RMSNorm: its input (the residual stream) and rstd; the reference kernel keeps its fp32
    upcast of the input (the input itself when already fp32) and x * rstd in fp32 (for the weight
    multiply's backward)."""
    saved_input = mb.residual_bytes if mb.fused_kernels else FP32
    normalized = 0 if mb.fused_kernels else FP32
    return mb.norm_tokens * ((saved_input + normalized) * config.hidden_size + FP32)


def gemm_input_bytes(config: ModelConfig, mb: MicroBatch) -> int:
    """The inputs linear_qkv and the MLP's gate/up GEMMs keep: the full local sequence even under
    SP (the all-gathered input is what F.linear saves). Under bf16 each input is cast once before
    the gather (parallel/layers.py gemm_input), so gate and up share one bf16 copy. In FP8 each is
    kept as its FP8 transpose; linear_proj keeps one of the context too (in bf16 the context
    linear_proj keeps is the one counted in attention_bytes)."""
    if mb.fp8:
        _, d, nq, _, _ = _local(config, mb)
        return mb.tokens * (config.hidden_size * 2 + nq * d)
    return mb.tokens * mb.compute_bytes * config.hidden_size * 2


def attention_bytes(config: ModelConfig, mb: MicroBatch, recompute_core: bool = False) -> int:
    """q (after RoPE; RoPE keeps only the shared cos/sin), k and v of the whole sequence (gathered
    over CP), the context (SDPA's output, kept by linear_proj), and, unless core attention is
    recomputed (selective), the kernel's softmax statistics (fp32 log-sum-exp per query and
    head) and under CP any mask SDPA keeps (cp_mask_bytes)."""
    _, d, nq, nkv, _ = _local(config, mb)
    a, cp = mb.compute_bytes, mb.context_parallel
    kept = mb.tokens * a * d * 2 * nq + mb.tokens * cp * a * d * 2 * nkv
    if recompute_core:
        return kept
    return kept + mb.tokens * FP32 * nq + cp_mask_bytes(mb) + document_mask_bytes(config, mb)


def document_kernel(document_attention: str | None, context_parallel: int) -> str | None:
    """The kernel packed documents run on a rank: the one this torch picks without CP, the mask
    under CP (model/core_attention.py runs varlen only without CP); None without packed documents."""
    if document_attention is None:
        return None
    return "mask" if context_parallel > 1 else document_attention


def document_mask_bytes(config: ModelConfig, mb: MicroBatch) -> int:
    """Packed documents through the sdpa backend on CUDA, beyond what attention_bytes counts:
    - 'mask' (masked_sdpa): the kernels that take a mask take no grouped KV heads, so k and v are
      repeated to nq heads and kept so (nq - nkv heads more), and the bool mask is kept as an
      additive one in the query dtype, [b, s/CP, keys] per layer. H200, 7B shape, 16 layers, seq
      4096: 80 MiB per layer, 1.25 GiB over the unpacked run, as measured (docs/planner.md);
    - 'varlen-repeat-kv' (torch's varlen flash kernel without grouped KV heads): the repeated k, v;
    - 'varlen': nothing (the flash kernel keeps what attention_bytes counts).
    Not modeled: the CPU reference path (the math kernel, fused_kernels False)."""
    kernel = document_kernel(mb.document_attention, mb.context_parallel)
    if kernel is None or kernel == "varlen" or not mb.fused_kernels:
        return 0
    _, d, nq, nkv, _ = _local(config, mb)
    keys = mb.seq_length
    repeated_kv = mb.micro_batch_size * keys * mb.compute_bytes * d * 2 * (nq - nkv)
    mask = mb.tokens * keys * mb.compute_bytes if kernel == "mask" else 0
    return repeated_kv + mask


def cp_mask_bytes(mb: MicroBatch) -> int:
    """Without document masks each of a CP rank's two chunks (c = s / 2CP tokens) attends
    bottom-right causally to the keys up to its end (model/core_attention.py). On CUDA the flash
    kernel does that with no mask. Elsewhere torch materializes a [c, keys] mask for a chunk whose
    query and key counts differ and keeps it (in the query dtype) for backward: on the busiest
    rank (any but rank 0) c x (r + 1) c + c x (2CP - r) c = c^2 (2CP + 1) elements."""
    if mb.context_parallel == 1 or mb.fused_kernels:
        return 0
    chunk = mb.seq_length // (2 * mb.context_parallel)
    element = mb.cp_mask_element_bytes or mb.compute_bytes
    return chunk * chunk * (2 * mb.context_parallel + 1) * element


def mlp_bytes(config: ModelConfig, mb: MicroBatch) -> int:
    """SwiGLU: gate, up and their product silu(gate) * up (linear_fc2's input); the reference
    kernel also keeps silu(gate), the Triton kernel recomputes it. In FP8: gate and up, and the
    product as linear_fc2's FP8 transpose (either kernel writes it straight from fp32)."""
    f = _local(config, mb)[4]
    if mb.fp8:
        return mb.tokens * f * (2 * mb.compute_bytes + 1)
    tensors = 3 if mb.fused_kernels else 4
    return tensors * mb.tokens * mb.compute_bytes * f


def layer_bytes(config: ModelConfig, mb: MicroBatch, recompute_core: bool = False) -> int:
    """Everything one transformer layer keeps for backward (no dropout: with p = 0 nothing is kept)."""
    return (2 * norm_bytes(config, mb) + gemm_input_bytes(config, mb)
            + attention_bytes(config, mb, recompute_core) + mlp_bytes(config, mb))


def layer_input_bytes(config: ModelConfig, mb: MicroBatch) -> int:
    """What a fully recomputed group of layers keeps: its input (the residual stream)."""
    return mb.norm_tokens * mb.residual_bytes * config.hidden_size


def rope_table_bytes(config: ModelConfig, mb: MicroBatch) -> int:
    """cos and sin, [s/CP, b, 1, d] fp32, computed once per forward and shared by all layers."""
    return 2 * mb.tokens * FP32 * config.head_dim


def output_bytes(config: ModelConfig, mb: MicroBatch, padded_vocab: int) -> int:
    """Last stage after the loss: the final norm, the loss head's input in the compute dtype, and
    the loss's state: the fused head keeps only int64 targets and an fp32 log-sum-exp per token
    (backward recomputes the logits chunk by chunk); the unfused one the fp32 softmax over this
    rank's vocabulary slice."""
    head_input = mb.tokens * mb.compute_bytes * config.hidden_size
    if mb.fused_kernels:
        return norm_bytes(config, mb) + head_input + mb.tokens * (8 + FP32)
    return norm_bytes(config, mb) + head_input + mb.tokens * FP32 * (padded_vocab // mb.tensor_parallel)


def loss_transient_bytes(config: ModelConfig, mb: MicroBatch, padded_vocab: int) -> int:
    """Extra bytes at the peak of the loss forward, on top of `output_bytes`. Unfused: the logits
    in the compute dtype and, under bf16, their fp32 copy. Fused: a bf16 copy of the output weight
    and one block of logits (and their fp32 statistics pass). (The final norm writes the compute
    dtype, so the head's input, counted in `output_bytes`, is the only copy of the hidden states.)"""
    vocab = padded_vocab // mb.tensor_parallel
    if mb.fused_kernels:
        weight_copy = 0 if mb.step_output_weight else vocab * config.hidden_size * mb.compute_bytes
        return weight_copy + _logits_block(mb, vocab)
    if not mb.bf16:
        return mb.tokens * vocab * FP32
    return mb.tokens * vocab * (mb.compute_bytes + FP32)


def _logits_block(mb: MicroBatch, vocab: int) -> int:
    """One block of the fused head's logits (kernels.linear_cross_entropy.default_blocking) in the
    compute dtype plus its fp32 statistics pass."""
    block = default_blocking(mb.tokens, vocab)
    return block.tokens * block.vocab * (mb.compute_bytes + FP32)


def loss_backward_bytes(config: ModelConfig, mb: MicroBatch, padded_vocab: int) -> int:
    """The loss head's bytes while its backward runs (every layer's activations are still held),
    in place of `output_bytes`: the final norm and head input, the logits gradient (one recomputed
    block fused; unfused, the [T, V] gradient in the compute dtype: the fp32 softmax buffer is
    released once the cross-entropy node has run), the output weight's new fp32 gradient (before
    it is added to .grad) with, under bf16, the weight's bf16 copy (fused: recast) or the bf16
    GEMM gradient (unfused), and the fp32 gradient of the head's input. With `step_output_weight`
    the fused head has neither the copy nor the new gradient. The head that makes its gradients
    in the forward (the trainer's weighted loss, kernels/weighted_linear_cross_entropy.py) holds
    the same at the end of its forward (a token block's logits over the local vocabulary, within
    the same 2^27 elements, and the fp32 hidden-state gradient) and less in its backward."""
    vocab = padded_vocab // mb.tensor_parallel
    head = norm_bytes(config, mb) + mb.tokens * mb.compute_bytes * config.hidden_size
    weight = vocab * config.hidden_size * (FP32 + (mb.compute_bytes if mb.bf16 else 0))
    if mb.fused_kernels and mb.step_output_weight:  # the per-step copy, gradient added in place
        weight = 0
    if mb.fused_kernels:
        logits = _logits_block(mb, vocab)
    else:
        logits = mb.tokens * vocab * mb.compute_bytes
    return head + weight + logits + mb.tokens * FP32 * config.hidden_size


def backward_workspace_bytes(config: ModelConfig, mb: MicroBatch) -> int:
    """Gradients alive at once inside one layer's backward: the incoming residual-stream gradient
    and two FFN-wide activation gradients (SwiGLU's backward)."""
    return mb.norm_tokens * mb.residual_bytes * config.hidden_size + 2 * mb.tokens * mb.compute_bytes * _local(config, mb)[4]
