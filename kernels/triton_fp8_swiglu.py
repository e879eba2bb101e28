"""SwiGLU that writes its output, or its gradient, straight in FP8 for the FP8 GEMM that reads it
(kernels/fp8_swiglu.py), Transformer Engine's fused activation-cast:

    forward   a   = silu(g) * u                       -> saturate(a * scale) [M, f] and its transpose
    backward  dg  = dy * u * silu'(g),  du = dy * silu(g)  -> saturate([dg, du] * scale) [M, 2f] and its transpose

each with max |value| folded into the scale slot's amax cell. g and u are the halves of one
[M, 2f] GEMM output. Unfused, the activation (or its gradient) is written in bf16 and read again
by the cast: 4 bytes per element more of HBM traffic. The values are quantized from fp32, without
the bf16 rounding in between.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_fp8_cast import TILE, quantize_store
from kernels.triton_launch import as_rows


@triton.jit
def _swiglu_cast_kernel(GU, OUT, OUT_T, SCALE, AMAX, M, F, stride_gu, limit,
                        TRANSPOSE: tl.constexpr, WITH_AMAX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    gate = GU + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]  # [BM, BN]; up is F columns on
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + F, mask=mask, other=0.0).to(tl.float32)
    amax = quantize_store(OUT, OUT_T, g * tl.sigmoid(g) * u, tl.load(SCALE), limit, rows, cols, mask, F, M, TRANSPOSE)
    if WITH_AMAX:
        tl.atomic_max(AMAX, amax)


@triton.jit
def _swiglu_grad_cast_kernel(GU, DY, OUT_G, OUT_U, OUT_T_G, OUT_T_U, SCALE, AMAX, M, F, stride_gu, stride_dy, limit,
                             TRANSPOSE: tl.constexpr, WITH_AMAX: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    gate = GU + rows[:, None].to(tl.int64) * stride_gu + cols[None, :]
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + F, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None].to(tl.int64) * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    scale = tl.load(SCALE)
    # silu'(g) = sig * (1 + g * (1 - sig)); the two halves of one [M, 2f] output (row stride 2F)
    amax_g = quantize_store(OUT_G, OUT_T_G, dy * u * sig * (1.0 + g * (1.0 - sig)), scale, limit, rows, cols, mask,
                            2 * F, M, TRANSPOSE)
    amax_u = quantize_store(OUT_U, OUT_T_U, dy * g * sig, scale, limit, rows, cols, mask, 2 * F, M, TRANSPOSE)
    if WITH_AMAX:
        tl.atomic_max(AMAX, tl.maximum(amax_g, amax_u))


def _gate_up_rows(gate_up: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """gate_up [.., 2f] -> (its rows [M, 2f] with unit column stride, M, f)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: gate_up's last dim must hold gate and up halves, got {gate_up.shape[-1]}.")
    rows = as_rows(gate_up)
    return rows, rows.shape[0], rows.shape[1] // 2


def swiglu_cast_transpose(gate_up: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, limit: float,
                          transpose: bool, amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gate_up [.., 2f] -> (saturate(silu(gate) * up * scale) [M, f] in fp8_dtype, its transpose
    [f, M] or None); folds the activation's max |value| into the fp32 cell `amax` when given."""
    gu, m, f = _gate_up_rows(gate_up)
    out = torch.empty((m, f), dtype=fp8_dtype, device=gu.device)
    out_t = torch.empty((f, m), dtype=torch.uint8, device=gu.device) if transpose else None
    grid = (triton.cdiv(m, TILE), triton.cdiv(f, TILE))
    _swiglu_cast_kernel[grid](gu, out, out_t if transpose else out, scale, amax if amax is not None else scale,
                              m, f, gu.stride(0), limit, TRANSPOSE=transpose, WITH_AMAX=amax is not None,
                              BM=TILE, BN=TILE, num_warps=4)
    return out, (out_t.view(fp8_dtype) if transpose else None)


def swiglu_grad_cast_transpose(gate_up: torch.Tensor, grad_y: torch.Tensor, scale: torch.Tensor,
                               fp8_dtype: torch.dtype, limit: float, transpose: bool,
                               amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """gate_up [.., 2f], grad_y [.., f] -> (the gradient of silu(gate) * up with respect to gate_up,
    saturate(grad * scale) [M, 2f] in fp8_dtype, its transpose [2f, M] or None); folds the
    gradient's max |value| into `amax` when given."""
    (gu, m, f), dy = _gate_up_rows(gate_up), as_rows(grad_y)
    if dy.shape != (m, f):
        raise ValueError(f"swiglu gradient: grad_y must be [{m}, {f}] for gate_up {tuple(gu.shape)}, got {tuple(dy.shape)}")
    out = torch.empty((m, 2 * f), dtype=fp8_dtype, device=gu.device)
    out_t = torch.empty((2 * f, m), dtype=torch.uint8, device=gu.device) if transpose else None
    halves_t = out_t.chunk(2, dim=0) if transpose else (out, out)  # rows [0, f) and [f, 2f) of the transpose
    grid = (triton.cdiv(m, TILE), triton.cdiv(f, TILE))
    _swiglu_grad_cast_kernel[grid](gu, dy, *out.chunk(2, dim=1), *halves_t, scale,
                                   amax if amax is not None else scale, m, f, gu.stride(0), dy.stride(0), limit,
                                   TRANSPOSE=transpose, WITH_AMAX=amax is not None, BM=TILE, BN=TILE, num_warps=4)
    return out, (out_t.view(fp8_dtype) if transpose else None)
