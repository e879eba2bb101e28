"""Triton RoPE for q and k in one launch (rotate-half layout, as kernels/rotary.py), and the same
kernel splitting Megatron's grouped QKV output into rotated q, k and v.

One program per (position, sample) token rotates all of that token's query and key heads with one
read of its cos/sin row. q and k may be strided views of the fused QKV output (last dim
contiguous); the outputs are new contiguous tensors. The backward applies the transposed rotation
(the same kernel with the sines' roles swapped), so nothing but cos/sin is saved. Split from the
grouped layout, the forward reads the heads where the QKV GEMM wrote them and the backward writes
dq, dk (rotated back) and dv into one grouped gradient: no separate split copies (~9 ms of a 7B-shape
step on an H200, docs/benchmarks.md).
"""
import torch
import triton
import triton.language as tl

from kernels.triton_launch import next_power_of_2


@triton.jit
def _rotate_heads(X, O, x_token, o_token, x_g, x_h, x_n, o_g, o_h, o_n, n_heads, half,
                  cos1, cos2, sin_x2_in_o1, sin_x1_in_o2,
                  ROTATE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """o1 = x1 * cos1 + x2 * sin_x2_in_o1;  o2 = x2 * cos2 + x1 * sin_x1_in_o2 (per head, halves of d),
    or a plain copy when not ROTATE. Head h of a tensor sits at (h // n) * stride_group +
    (h % n) * stride_head from its token's offset (n: heads per group; _g, _h, _n of X and O)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x_ptr = X + x_token + (heads // x_n) * x_g + (heads % x_n) * x_h + dims
    o_ptr = O + o_token + (heads // o_n) * o_g + (heads % o_n) * o_h + dims
    x1 = tl.load(x_ptr, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0)
    if ROTATE:
        x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
        x1, x2 = x1 * cos1 + x2 * sin_x2_in_o1, x2 * cos2 + x1 * sin_x1_in_o2
    tl.store(o_ptr, x1.to(O.dtype.element_ty), mask=mask)
    tl.store(o_ptr + half, x2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qkv(Q, K, V, COS, SIN, QO, KO, VO,
              q_s, q_b, q_g, q_h, q_n, k_s, k_b, k_g, k_h, k_n, v_s, v_b, v_g, v_h, v_n,
              qo_s, qo_b, qo_g, qo_h, qo_n, ko_s, ko_b, ko_g, ko_h, ko_n, vo_s, vo_b, vo_g, vo_h, vo_n,
              sc_s, sc_b, batch, n_q, n_k, half,
              TRANSPOSE: tl.constexpr, HAS_V: tl.constexpr,
              BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token: rotate its query and key heads (and copy its value heads when HAS_V).
    Every tensor is addressed by (stride_s, stride_b, stride_group, stride_head, heads_per_group),
    which covers contiguous [s, b, n, d] tensors and the heads of Megatron's grouped QKV layout."""
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
    _rotate_heads(Q, QO, s * q_s + b * q_b, s * qo_s + b * qo_b, q_g, q_h, q_n, qo_g, qo_h, qo_n,
                  n_q, half, cos1, cos2, a, c, True, BLOCK_Q, BLOCK_D)
    _rotate_heads(K, KO, s * k_s + b * k_b, s * ko_s + b * ko_b, k_g, k_h, k_n, ko_g, ko_h, ko_n,
                  n_k, half, cos1, cos2, a, c, True, BLOCK_K, BLOCK_D)
    if HAS_V:
        _rotate_heads(V, VO, s * v_s + b * v_b, s * vo_s + b * vo_b, v_g, v_h, v_n, vo_g, vo_h, vo_n,
                      n_k, half, cos1, cos2, a, c, False, BLOCK_K, BLOCK_D)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _heads(t: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Layout of a 4-D [s, b, n, d] tensor (unit stride along d): one group of n heads."""
    return t.stride(0), t.stride(1), 0, t.stride(2), t.shape[2]


def _grouped_heads(grouped: torch.Tensor, count: int) -> tuple[int, int, int, int, int]:
    """Layout of `count` consecutive heads per group of grouped [s, b, g, w, d] (the base pointer
    passed with it says at which head of the group they start)."""
    return grouped.stride(0), grouped.stride(1), grouped.stride(2), grouped.stride(3), count


def _tables(cos, sin, seq, batch, dim):
    # Broadcast tables ([s, 1, 1, d]) become stride-0 views; the kernel indexes both with cos's strides.
    cos, sin = cos.expand(seq, batch, 1, dim), sin.expand(seq, batch, 1, dim)
    cos, sin = _unit_last_stride(cos), _unit_last_stride(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def _rope(q, k, v, outs, layouts, cos, sin, batch, n_q, n_k, dim, transpose: bool):
    """Launch _rope_qkv: q/k/v are base pointers (v may be None), layouts their and outs' addressing."""
    half = dim // 2
    block_d = next_power_of_2(half)
    seq = cos.shape[0]
    _rope_qkv[(seq * batch,)](
        q, k, v if v is not None else k, cos, sin, *outs, *(x for layout in layouts for x in layout),
        cos.stride(0), cos.stride(1), batch, n_q, n_k, half, TRANSPOSE=transpose, HAS_V=v is not None,
        BLOCK_Q=next_power_of_2(n_q), BLOCK_K=next_power_of_2(n_k), BLOCK_D=block_d,
        num_warps=4 if n_q * block_d <= 4096 else 8,
    )


def _launch(q, k, cos, sin, transpose: bool):
    """Rotate q [s, b, nq, d] and k [s, b, nkv, d] by the tables cos/sin [s, b, 1, d]."""
    seq, batch, n_q, dim = q.shape
    cos, sin = _tables(cos, sin, seq, batch, dim)
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    layouts = (_heads(q), _heads(k), _heads(k), _heads(q_out), _heads(k_out), _heads(k_out))
    _rope(q, k, None, (q_out, k_out, k_out), layouts, cos, sin, batch, n_q, k.shape[2], dim, transpose)
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


class TritonSplitRotaryQKV(torch.autograd.Function):
    """Megatron's grouped QKV output [s, b, g, q_per_g + 2, d] -> rotated q [s, b, g * q_per_g, d],
    rotated k and v [s, b, g, d], contiguous, in one pass: the heads are read where the QKV GEMM
    wrote them. The backward rotates dq and dk back straight into their places of one grouped
    gradient and copies dv into its place, also in one pass."""

    @staticmethod
    def forward(ctx, grouped, cos, sin):
        seq, batch, groups, width, dim = grouped.shape
        q_per_g = width - 2
        cos, sin = _tables(cos, sin, seq, batch, dim)
        outs = tuple(grouped.new_empty(seq, batch, groups * n, dim) for n in (q_per_g, 1, 1))
        layouts = (_grouped_heads(grouped, q_per_g), _grouped_heads(grouped, 1), _grouped_heads(grouped, 1),
                   *(_heads(out) for out in outs))
        _rope(grouped, grouped[:, :, :, q_per_g], grouped[:, :, :, q_per_g + 1], outs, layouts, cos, sin,
              batch, groups * q_per_g, groups, dim, transpose=False)
        ctx.save_for_backward(cos, sin)
        ctx.shape = grouped.shape
        return outs

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        cos, sin = ctx.saved_tensors
        seq, batch, groups, width, dim = ctx.shape
        q_per_g = width - 2
        grads = tuple(_unit_last_stride(g) for g in (grad_q, grad_k, grad_v))
        grad = grads[0].new_empty(ctx.shape)
        layouts = (*(_heads(g) for g in grads), _grouped_heads(grad, q_per_g), _grouped_heads(grad, 1),
                   _grouped_heads(grad, 1))
        outs = (grad, grad[:, :, :, q_per_g], grad[:, :, :, q_per_g + 1])
        _rope(*grads, outs, layouts, cos, sin, batch, groups * q_per_g, groups, dim, transpose=True)
        return grad, None, None


def split_qkv_rotary_triton(grouped, cos, sin):
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the Triton kernel gives no gradient for cos/sin; they must not require grad "
                         "(the model derives them from position ids). Use impl='reference' to differentiate them.")
    if grouped.shape[-1] % 2 or grouped.stride(-1) != 1:
        raise ValueError(f"rope: the head dim must be even and contiguous, got shape {tuple(grouped.shape)}, "
                         f"strides {grouped.stride()}.")
    return TritonSplitRotaryQKV.apply(grouped, cos, sin)


def apply_rotary_emb_qk_triton(q, k, cos, sin):
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: the Triton kernel gives no gradient for cos/sin; they must not require grad "
                         "(the model derives them from position ids). Use impl='reference' to differentiate them.")
    if q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q and k need the same even head dim, got {q.shape[-1]} and {k.shape[-1]}.")
    return TritonRotaryQK.apply(q, k, cos, sin)
