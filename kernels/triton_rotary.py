"""Triton RoPE for q and k in one launch (rotate-half layout, as kernels/rotary.py).

One program per (position, sample) token rotates all of that token's query and key heads with one
read of its cos/sin row. q and k may be strided views of the fused QKV output (last dim
contiguous); the outputs are new contiguous tensors. The backward applies the transposed rotation
(the same kernel with the sines' roles swapped), so nothing but cos/sin is saved.
"""
import torch
import triton
import triton.language as tl

from kernels.triton_launch import next_power_of_2


@triton.jit
def _rotate_heads(X, O, stride_xs, stride_xb, stride_xh, token, s, b, n_heads, half,
                  cos1, cos2, sin_x2_in_o1, sin_x1_in_o2, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """o1 = x1 * cos1 + x2 * sin_x2_in_o1;  o2 = x2 * cos2 + x1 * sin_x1_in_o2 (per head, halves of d).
    X is strided over (s, b, head); O is contiguous [tokens, n_heads, 2 * half]."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x_ptr = X + s * stride_xs + b * stride_xb + heads * stride_xh + dims
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    o_ptr = O + (token * n_heads + heads) * (2 * half) + dims
    tl.store(o_ptr, (x1 * cos1 + x2 * sin_x2_in_o1).to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, (x2 * cos2 + x1 * sin_x1_in_o2).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk(Q, K, COS, SIN, QO, KO, sq_s, sq_b, sq_h, sk_s, sk_b, sk_h, sc_s, sc_b, batch, n_q, n_k, half,
             TRANSPOSE: tl.constexpr,
             BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    s = token // batch
    b = token % batch
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < half
    table = s * sc_s + b * sc_b + dims
    cos1 = tl.load(COS + table, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + table + half, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + table, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + table + half, mask=dmask, other=0.0).to(tl.float32)
    # Forward: o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2. Its transpose: o1 = x1 c1 + x2 s2, o2 = x2 c2 - x1 s1.
    if TRANSPOSE:
        a, c = sin2, -sin1
    else:
        a, c = -sin1, sin2
    _rotate_heads(Q, QO, sq_s, sq_b, sq_h, token, s, b, n_q, half, cos1, cos2, a, c, BLOCK_Q, BLOCK_D)
    _rotate_heads(K, KO, sk_s, sk_b, sk_h, token, s, b, n_k, half, cos1, cos2, a, c, BLOCK_K, BLOCK_D)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, transpose: bool):
    """Rotate q [s, b, nq, d] and k [s, b, nkv, d] by the tables cos/sin [s, b, 1, d]."""
    seq, batch, n_q, dim = q.shape
    # Broadcast tables ([s, 1, 1, d]) become stride-0 views; kernel indexes both with cos's strides.
    cos, sin = cos.expand(seq, batch, 1, dim), sin.expand(seq, batch, 1, dim)
    q, k, cos, sin = map(_unit_last_stride, (q, k, cos, sin))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    half = dim // 2
    block_d = next_power_of_2(half)
    _rope_qk[(seq * batch,)](
        q, k, cos, sin, q_out, k_out, *q.stride()[:3], *k.stride()[:3], cos.stride(0), cos.stride(1),
        batch, n_q, k.shape[2], half, TRANSPOSE=transpose,
        BLOCK_Q=next_power_of_2(n_q), BLOCK_K=next_power_of_2(k.shape[2]), BLOCK_D=block_d,
        num_warps=4 if n_q * block_d <= 4096 else 8,
    )
    return q_out, k_out


class TritonRotaryQK(torch.autograd.Function):
    """(q, k) -> (q * cos + rotate_half(q) * sin, same for k); the tables get no gradient."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = _launch(grad_q, grad_k, cos, sin, transpose=True)
        return grad_q, grad_k, None, None


def apply_rotary_emb_qk_triton(q, k, cos, sin):
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the Triton kernel gives no gradient for cos/sin; they must not require grad "
                         "(the model derives them from position ids). Use impl='reference' to differentiate them.")
    if q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q and k need the same even head dim, got {q.shape[-1]} and {k.shape[-1]}.")
    return TritonRotaryQK.apply(q, k, cos, sin)
