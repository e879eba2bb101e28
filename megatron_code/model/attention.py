"""Causal grouped-query self-attention with RoPE and a fused QKV projection."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.rotary import SplitGroupedQKV, split_qkv_rotary
from megatron_code.model.config import ModelConfig
from megatron_code.model.core_attention import build_core_attention
from megatron_code.parallel.context import gather_sequence
from megatron_code.parallel.layers import SINGLE, ColumnParallelLinear, RowParallelLinear
from megatron_code.parallel.state import ParallelState


class SelfAttention(nn.Module):
    """x -> linear_qkv -> RoPE(q, k) -> core attention -> linear_proj.

    linear_qkv's output rows are grouped per KV head, Megatron-style: for each of the nkv groups,
    the group's (nq / nkv) query heads, then its key head, then its value head. Splitting the rows
    into contiguous chunks therefore splits whole GQA groups, which is what tensor parallelism does:
    each TP rank holds nq / TP query heads and nkv / TP key/value heads.
    """

    def __init__(self, config: ModelConfig, parallel: ParallelState = SINGLE):
        super().__init__()
        self.parallel = parallel
        self.num_heads = config.num_attention_heads // parallel.tp  # local heads
        self.num_kv_heads = config.num_kv_heads // parallel.tp
        self.head_dim = config.head_dim
        self.rope_impl = config.rope_impl
        qkv_rows = (config.num_attention_heads + 2 * config.num_kv_heads) * self.head_dim
        self.linear_qkv = ColumnParallelLinear(config.hidden_size, qkv_rows, parallel)
        self.core_attention = build_core_attention(config)
        self.recompute_core_attention = config.recompute_granularity == "selective"
        self.linear_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, parallel)

    def grouped_qkv(self, mixed: torch.Tensor) -> torch.Tensor:
        """[s, b, nkv * (q_per_kv + 2) * d] -> the view [s, b, nkv, q_per_kv + 2, d]."""
        s, b, _ = mixed.shape
        return mixed.view(s, b, self.num_kv_heads, self.num_heads // self.num_kv_heads + 2, self.head_dim)

    def split_qkv(self, mixed: torch.Tensor):
        """[s, b, nkv * (q_per_kv + 2) * d] -> q [s, b, nq, d], k and v [s, b, nkv, d] (no RoPE)."""
        return SplitGroupedQKV.apply(self.grouped_qkv(mixed))

    def forward(self, x, rotary_cos, rotary_sin, segment_ids=None, cp_chunks=None):
        """x: [s, b, h] -> [s, b, h] ([s/tp, b, h] in and out under sequence parallelism; s is
        this rank's s/cp tokens under context parallelism)."""
        q, k, v = split_qkv_rotary(self.grouped_qkv(self.linear_qkv(x)), rotary_cos, rotary_sin, self.rope_impl)
        if self.parallel.cp > 1:  # every rank's keys/values, in sequence order: [s, b, nkv, d]
            k = gather_sequence(k, self.parallel.cp, self.parallel.cp_group)
            v = gather_sequence(v, self.parallel.cp, self.parallel.cp_group)
        context = self._core_attention(q, k, v, segment_ids, cp_chunks)  # [s, b, nq * d]
        return self.linear_proj(context)

    def _core_attention(self, q, k, v, segment_ids, cp_chunks):
        """Selective recompute (Megatron's core_attn): keep only q, k, v; the kernel's saved state
        (softmax statistics, the context-parallel mask, any s x s buffers) is rebuilt in backward."""
        if self.recompute_core_attention and self.training and torch.is_grad_enabled():
            return checkpoint(self.core_attention, q, k, v, segment_ids, cp_chunks, use_reentrant=False)
        return self.core_attention(q, k, v, segment_ids, cp_chunks)
