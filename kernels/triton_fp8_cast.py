"""One-pass FP8 cast on CUDA: out = saturate(x * scale) in FP8, and optionally amax(|x|) in the same
read of x (what delayed scaling records), instead of torch's four passes (upcast, multiply, clamp,
downcast) plus a separate reduction. Each program handles BLOCK elements and folds its block's
amax into one fp32 cell with an atomic max (amax is non-negative, so float max is order-free)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _scaled_cast_kernel(x_ptr, out_ptr, scale_ptr, amax_ptr, n_elements, limit,
                        WITH_AMAX: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scaled = tl.minimum(tl.maximum(x * tl.load(scale_ptr), -limit), limit)
    tl.store(out_ptr + offsets, scaled.to(out_ptr.dtype.element_ty), mask=mask)
    if WITH_AMAX:
        tl.atomic_max(amax_ptr, tl.max(tl.abs(x), axis=0))


def scaled_cast(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype, limit: float,
                with_amax: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (any float dtype, any shape) -> (x * scale saturated to +-limit in fp8_dtype, amax or None)."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=fp8_dtype, device=x.device)
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    n = x.numel()
    grid = (triton.cdiv(n, BLOCK),)
    _scaled_cast_kernel[grid](x, out, scale.reshape(1).float(), amax, n, limit,
                              WITH_AMAX=with_amax, BLOCK=BLOCK)
    return out, (amax if with_amax else None)
