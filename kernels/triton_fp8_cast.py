"""One-pass FP8 cast (and transpose) on CUDA, Transformer Engine's cast_transpose:

    out   = saturate(x * scale)   in FP8, row-major [M, N]
    out_t = out^T                 row-major [N, M]  (optional: the layout the backward GEMMs want)
    amax  = max(amax, max|x|)     (optional: what delayed scaling records)

in a single read of x, where torch takes four passes for the cast (upcast, multiply, clamp,
downcast), one for the amax and one for the transpose. `scale` and `amax` are one-element device
tensors (views into a layer's scaling state), so the scale never travels through the host.
Each program handles a [BM, BN] tile: coalesced loads along x's rows, coalesced stores along
out's rows and (after an in-register transpose) along out_t's rows, and one atomic max of the
tile's amax (amax is non-negative, so float max is order-free).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 64


@triton.jit
def quantize_store(OUT, OUT_T, x, scale, limit, rows, cols, mask, stride_out, stride_out_t,
                   TRANSPOSE: tl.constexpr):
    """Store saturate(x * scale) of the fp32 tile x [BM, BN] (zero where masked) at OUT[rows, cols]
    in OUT's FP8 dtype and, when TRANSPOSE, its bytes at OUT_T[cols, rows] (a uint8 view); returns
    the tile's max |x|. Shared by every kernel that writes an FP8 GEMM operand."""
    q = tl.minimum(tl.maximum(x * scale, -limit), limit).to(OUT.dtype.element_ty)  # [BM, BN]
    tl.store(OUT + rows[:, None].to(tl.int64) * stride_out + cols[None, :], q, mask=mask)
    if TRANSPOSE:  # moved as bytes: the transpose does not care what the bits mean
        out_t = OUT_T + cols[:, None].to(tl.int64) * stride_out_t + rows[None, :]  # [BN, BM]: out_t[c, r] = out[r, c]
        tl.store(out_t, tl.trans(q.to(tl.uint8, bitcast=True)), mask=tl.trans(mask))
    return tl.max(tl.max(tl.abs(x), axis=1), axis=0)


@triton.jit
def _cast_transpose_kernel(X, OUT, OUT_T, SCALE, AMAX, M, N, stride_x, limit,
                           TRANSPOSE: tl.constexpr, WITH_AMAX: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = quantize_store(OUT, OUT_T, x, tl.load(SCALE), limit, rows, cols, mask, N, M, TRANSPOSE)
    if WITH_AMAX:
        tl.atomic_max(AMAX, amax)


def cast_transpose(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, limit: float,
                   transpose: bool, amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, N] (any float dtype, unit stride along N) -> (x * scale saturated to +-limit in fp8_dtype,
    its transpose [N, M] or None); folds max|x| into the fp32 cell `amax` when given."""
    if x.dim() != 2 or x.stride(1) != 1:
        x = x.reshape(-1, x.shape[-1]).contiguous()
    m, n = x.shape
    out = torch.empty((m, n), dtype=fp8_dtype, device=x.device)
    out_t = torch.empty((n, m), dtype=fp8_dtype, device=x.device) if transpose else None
    grid = (triton.cdiv(m, TILE), triton.cdiv(n, TILE))
    _cast_transpose_kernel[grid](
        x, out, out_t.view(torch.uint8) if transpose else out, scale, amax if amax is not None else scale,
        m, n, x.stride(0), limit, TRANSPOSE=transpose, WITH_AMAX=amax is not None, BM=TILE, BN=TILE, num_warps=4)
    return out, out_t
