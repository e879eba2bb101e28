"""Triton AdamW: one pass over a parameter that reads the parameter, its gradient and both moments
once and writes the three updated tensors (28 bytes per fp32 element, the least an AdamW step
can move), clipping included.

torch's fused AdamW moves the same bytes but reached ~60% of HBM bandwidth on an H200 (38 ms for
the 3.9 B fp32 parameters of the 16-layer 7B shape against 23 ms at full bandwidth,
docs/benchmarks.md); its multi-tensor launcher walks 64 K-element chunks with four elements per
thread. Here each program streams a contiguous block of one tensor, one launch per parameter.

The math is torch.optim.AdamW's (decoupled weight decay, bias corrections), in fp32 whatever the
storage dtype: g = grad / grad_scale; p *= 1 - lr * wd; m = lerp(m, g, 1 - beta1);
v = beta2 * v + (1 - beta2) * g^2; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
"""
import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _adamw_step(P, G, M, V, SCALE, n, lr, beta1, beta2, eps, decay, step_size, bc2_sqrt,
                HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    p = tl.load(P + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(SCALE).to(tl.float32)
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)  # lerp(m, g, 1 - beta1), as torch writes it
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(P + offsets, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + offsets, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offsets, v.to(V.dtype.element_ty), mask=mask)


def adamw_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW step of one parameter, in place; `step` counts this step (1 on the first).
    grad_scale: a one-element tensor the gradient is divided by (clipping), or None."""
    n = param.numel()
    if n == 0:
        return
    step_size = lr / (1.0 - beta1 ** step)
    bc2_sqrt = (1.0 - beta2 ** step) ** 0.5
    scale = grad_scale if grad_scale is not None else param  # any pointer; unread without HAS_SCALE
    _adamw_step[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, scale, n, lr, beta1, beta2, eps, 1.0 - lr * weight_decay,
        step_size, bc2_sqrt, HAS_SCALE=grad_scale is not None, BLOCK=BLOCK, num_warps=NUM_WARPS)
