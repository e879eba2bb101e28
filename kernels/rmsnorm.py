"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, reduced in fp32 whatever the input dtype.

`rms_norm(..., impl=)` picks the implementation (kernels/dispatch.py): the plain-torch reference
below, the Triton kernels (kernels/triton_rmsnorm.py), or Transformer Engine's / apex's fused
RMSNorm modules applied to our weight. `add_rms_norm` is the residual add followed by the norm,
one kernel each way with Triton.
"""
from __future__ import annotations

import functools
import importlib

import torch
from torch.func import functional_call

from kernels.dispatch import select, triton_module

RMSNORM_IMPLS = ("auto", "triton", "reference", "te", "apex")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch RMSNorm over the last dimension. The mean of squares is taken in fp32 because
    bf16 accumulation over a 4096-wide row loses ~3 significant bits; the output has out_dtype
    (default: x's dtype)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(out_dtype or x.dtype)


@functools.cache
def _library_norm(impl: str, hidden_size: int, eps: float, dtype: torch.dtype, device: torch.device):
    """A TE / apex RMSNorm module of the right shape; our weight is swapped in at call time, so
    the module's own parameter is never trained or saved."""
    if impl == "te":
        te = importlib.import_module("transformer_engine.pytorch")
        return te.RMSNorm(hidden_size, eps=eps, params_dtype=dtype, device=device)
    normalization = importlib.import_module("apex.normalization")
    return normalization.MixedFusedRMSNorm(hidden_size, eps=eps).to(device=device, dtype=dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto",
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dim with the implementation `impl` (see RMSNORM_IMPLS), output in
    out_dtype (default: x's dtype)."""
    chosen = select("rmsnorm", impl, x.device, RMSNORM_IMPLS)
    if chosen == "reference":
        return rms_norm_reference(x, weight, eps, out_dtype)
    if chosen == "triton":
        return triton_module("triton_rmsnorm").rms_norm_triton(x, weight, eps, out_dtype)
    module = _library_norm(chosen, weight.shape[0], eps, weight.dtype, weight.device)
    y = functional_call(module, {"weight": weight}, (x,))
    return y if out_dtype is None else y.to(out_dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto",
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + delta (the residual add before a pre-norm block), h in the
    promoted dtype of x and delta, the norm in out_dtype (default: h's dtype). Triton fuses the add
    into the norm both ways; the other implementations add, then normalize."""
    chosen = select("rmsnorm", impl, x.device, RMSNORM_IMPLS)
    if chosen == "triton":
        return triton_module("triton_rmsnorm").add_rms_norm_triton(x, delta, weight, eps, out_dtype)
    h = x + delta
    return h, rms_norm(h, weight, eps, chosen, out_dtype)
