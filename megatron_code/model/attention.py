"""Causal grouped-query self-attention with RoPE and a fused QKV projection."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.rotary import apply_rotary_emb_qk
from megatron_code.model.config import ModelConfig
from megatron_code.model.core_attention import build_core_attention
from megatron_code.parallel.context import gather_sequence
from megatron_code.parallel.layers import SINGLE, ColumnParallelLinear, RowParallelLinear
from megatron_code.parallel.state import ParallelState


class _SplitGroupedQKV(torch.autograd.Function):
    """grouped [s, b, nkv, q_per_kv + 2, d] -> contiguous q [s, b, nkv * q_per_kv, d], k and v
    [s, b, nkv, d]. Autograd's backward of slicing views would build three zero-filled
    [s, b, nkv, q_per_kv + 2, d] gradients and add them up; this one writes dq, dk and dv into
    their places of a single buffer."""

    @staticmethod
    def forward(ctx, grouped):
        s, b, nkv, width, d = grouped.shape
        q_per_kv = width - 2
        q = grouped[:, :, :, :q_per_kv].reshape(s, b, nkv * q_per_kv, d)  # a copy: the slice is strided
        return q, grouped[:, :, :, q_per_kv].contiguous(), grouped[:, :, :, q_per_kv + 1].contiguous()

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        s, b, nkv, d = grad_k.shape
        q_per_kv = grad_q.shape[2] // nkv
        grad = grad_q.new_empty(s, b, nkv, q_per_kv + 2, d)
        grad[:, :, :, :q_per_kv].copy_(grad_q.reshape(s, b, nkv, q_per_kv, d))
        grad[:, :, :, q_per_kv].copy_(grad_k)
        grad[:, :, :, q_per_kv + 1].copy_(grad_v)
        return grad


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

    def split_qkv(self, mixed: torch.Tensor):
        """[s, b, nkv * (q_per_kv + 2) * d] -> q [s, b, nq, d], k and v [s, b, nkv, d]."""
        s, b, _ = mixed.shape
        q_per_kv = self.num_heads // self.num_kv_heads
        grouped = mixed.view(s, b, self.num_kv_heads, q_per_kv + 2, self.head_dim)
        return _SplitGroupedQKV.apply(grouped)

    def forward(self, x, rotary_cos, rotary_sin, segment_ids=None, cp_chunks=None):
        """x: [s, b, h] -> [s, b, h] ([s/tp, b, h] in and out under sequence parallelism; s is
        this rank's s/cp tokens under context parallelism)."""
        q, k, v = self.split_qkv(self.linear_qkv(x))
        q, k = apply_rotary_emb_qk(q, k, rotary_cos, rotary_sin, self.rope_impl)
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
