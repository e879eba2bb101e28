"""Rotary position embedding in the "rotate half" layout used by Megatron-LM and HF Llama.

Dimension j < d/2 of a head is paired with dimension j + d/2; the pair is rotated by angle
position * inv_freq[j]. (Meta's original checkpoints pair adjacent dims instead; the HF converter
permutes q/k rows for those, so our layout converts to HF Llama without any permutation.)

`apply_rotary_emb_qk(..., impl=)` rotates q and k together with the implementation chosen by
kernels/dispatch.py: the plain-torch reference below or one Triton launch (kernels/triton_rotary.py).
`split_qkv_rotary(..., impl=)` also splits them (and v) out of Megatron's grouped QKV output.
"""
from __future__ import annotations

import torch

from kernels.dispatch import select, triton_module

ROPE_IMPLS = ("auto", "triton", "reference")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] along the last dim (the multiplication by i of the complex pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [s, b, n, d]; cos/sin: [s, b, 1, d] (broadcast over heads). Computed in fp32."""
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of one tensor (plain torch)."""
    return apply_rotary_emb_reference(x, cos, sin)


def apply_rotary_emb_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q [s, b, nq, d], k [s, b, nkv, d], cos/sin [s, b, 1, d] fp32 -> rotated (q, k) in their dtypes."""
    if select("rope", impl, q.device, ROPE_IMPLS) == "triton":
        return triton_module("triton_rotary").apply_rotary_emb_qk_triton(q, k, cos, sin)
    return apply_rotary_emb_reference(q, cos, sin), apply_rotary_emb_reference(k, cos, sin)


class SplitGroupedQKV(torch.autograd.Function):
    """grouped [s, b, g, q_per_g + 2, d] -> contiguous q [s, b, g * q_per_g, d], k and v
    [s, b, g, d]. Autograd's backward of slicing views would build three zero-filled
    [s, b, g, q_per_g + 2, d] gradients and add them up; this one writes dq, dk and dv into
    their places of a single buffer."""

    @staticmethod
    def forward(ctx, grouped):
        s, b, groups, width, d = grouped.shape
        q_per_g = width - 2
        q = grouped[:, :, :, :q_per_g].reshape(s, b, groups * q_per_g, d)  # a copy: the slice is strided
        return q, grouped[:, :, :, q_per_g].contiguous(), grouped[:, :, :, q_per_g + 1].contiguous()

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        s, b, groups, d = grad_k.shape
        q_per_g = grad_q.shape[2] // groups
        grad = grad_q.new_empty(s, b, groups, q_per_g + 2, d)
        grad[:, :, :, :q_per_g].copy_(grad_q.reshape(s, b, groups, q_per_g, d))
        grad[:, :, :, q_per_g].copy_(grad_k)
        grad[:, :, :, q_per_g + 1].copy_(grad_v)
        return grad


def split_qkv_rotary(grouped: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped QKV output [s, b, g, q_per_g + 2, d] (per KV group: its query heads, its
    key head, its value head) -> rotated q [s, b, g * q_per_g, d], rotated k and v [s, b, g, d],
    contiguous. cos/sin [s, b, 1, d] fp32. Triton: one pass each way; reference: split, then rotate."""
    if select("rope", impl, grouped.device, ROPE_IMPLS) == "triton":
        return triton_module("triton_rotary").split_qkv_rotary_triton(grouped, cos, sin)
    q, k, v = SplitGroupedQKV.apply(grouped)
    return apply_rotary_emb_reference(q, cos, sin), apply_rotary_emb_reference(k, cos, sin), v
