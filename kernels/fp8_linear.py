"""y = x W^T with all three GEMMs of a linear layer in FP8 through `torch._scaled_mm`.

    forward  y  = x  W^T :  x (e4m3) [N, in]   x  W (e4m3) [out, in]^T  -> [N, out]
    dgrad    dx = dy W   :  dy (e5m2 under hybrid) [N, out] x W [out, in] -> [N, in]
    wgrad    dW = dy^T x :  dy^T [out, N]        x  x [N, in]             -> [out, in]

Each operand is cast with its own per-tensor scale (kernels.fp8_scaling) and the product is
rescaled by 1 / (scale_a * scale_b) inside the GEMM; accumulation is fp32 and the output has the
compute dtype (bf16 under autocast). `_scaled_mm` wants its first operand row-major and its second
column-major, so each cast also writes the transposed layout its backward GEMM needs (x^T, dY^T,
W^T) in the same pass; the forward keeps only x^T in FP8 for the backward, half the saved bytes of
a bf16 linear. On CUDA every dimension must be a multiple of 16 (checked, with the fix named).

Under gradient-accumulation fusion (megatron_code/parallel/fused_wgrad.py) the weight gradient goes
straight into the fp32 leaf's `.grad`: the step's first micro-batch writes it with `_scaled_mm`,
later ones add into it inside an FP8 GEMM (kernels/triton_fp8_gemm.py; `wgrad_impl` 'reference':
`_scaled_mm`, then an add), and autograd gets no weight gradient to add.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from kernels.dispatch import select, triton_module
from kernels.fp8_history import AmaxHistories
from kernels.grad_accumulation import fp32_gradient
from kernels.fp8_scaling import Fp8Tensor, ScalingConfig, TensorScaling, new_histories


# How a fused weight gradient is added into the fp32 gradient (kernels.dispatch's rule for 'auto').
FP8_WGRAD_IMPLS = ("auto", "triton", "reference")


class Fp8LinearScaling:
    """The three scale slots of one FP8 linear layer (input, weight, output gradient), rows of
    `histories` (one per model, so that a step advances all of them at once) or of their own;
    `wgrad_impl` (FP8_WGRAD_IMPLS) adds a fused weight gradient into the fp32 gradient."""

    def __init__(self, config: ScalingConfig, histories: AmaxHistories | None = None, wgrad_impl: str = "auto"):
        self.config = config
        self.wgrad_impl = wgrad_impl
        self.histories = histories if histories is not None else new_histories(config)
        self.input = TensorScaling(config, is_gradient=False, histories=self.histories)
        self.weight = TensorScaling(config, is_gradient=False, histories=self.histories)
        self.grad_output = TensorScaling(config, is_gradient=True, histories=self.histories)


def check_shapes(x2d: torch.Tensor, weight: torch.Tensor) -> None:
    if x2d.device.type != "cuda":
        return
    dims = {"tokens (seq x micro batch)": x2d.shape[0], "in_features": weight.shape[1],
            "out_features": weight.shape[0]}
    bad = {name: size for name, size in dims.items() if size % 16}
    if bad:
        raise ValueError(
            f"FP8 GEMMs need every dimension divisible by 16, got {bad}. Choose sizes that are "
            "multiples of 16, or keep this layer in BF16 (--fp8-format unset, or "
            "--num-layers-at-start-in-bf16 / --num-layers-at-end-in-bf16)."
        )


def _scaled_mm(a_fp8, b_fp8_colmajor, a_scale_inv, b_scale_inv, out_dtype, fast_accum=False, out=None):
    # scale_a/scale_b of _scaled_mm multiply the FP8 product back (dequantization scales).
    # fast_accum: Hopper's FP8 tensor cores accumulate in fewer bits unless partial sums are
    # promoted to fp32 every few steps; Transformer Engine skips the promotion in the forward GEMM
    # only, and so do we.
    # Autocast must not touch it: CPU's casts the fp32 scales to bf16 (each rounded by up to 2^-9,
    # pinned by tests/test_fp8.py under autocast); every dtype here is already explicit. The C++
    # guard rather than torch.autocast(enabled=False): this runs for every FP8 GEMM.
    with torch._C._DisableAutocast():
        return torch._scaled_mm(a_fp8, b_fp8_colmajor, scale_a=a_scale_inv, scale_b=b_scale_inv,
                                out_dtype=out_dtype, use_fast_accum=fast_accum, out=out)


def accumulate_wgrad(weight: torch.Tensor, grad_t: torch.Tensor, x_t: torch.Tensor, grad_scale_inv: torch.Tensor,
                     x_scale_inv: torch.Tensor, impl: str) -> None:
    """weight.grad (fp32, weight's shape, made when None) (+)= dY^T x, from dY^T [out, N] and
    x^T [in, N] in FP8 with their dequantization scales; weight's rows are [out, in] flattened."""
    grad, fresh = fp32_gradient(weight)
    target = grad.view(-1, weight.shape[-1])  # [out, in]
    if fresh:
        _scaled_mm(grad_t, x_t.t(), grad_scale_inv, x_scale_inv, torch.float32, out=target)
    elif select("fp8 weight gradient", impl, target.device, FP8_WGRAD_IMPLS) == "triton":
        triton_module("triton_fp8_gemm").fp8_gemm(target, grad_t, x_t, grad_scale_inv, x_scale_inv, accumulate=True)
    else:
        target.add_(_scaled_mm(grad_t, x_t.t(), grad_scale_inv, x_scale_inv, torch.float32))


class Fp8Weight(NamedTuple):
    """The weight side of one FP8 linear, what its GEMMs need besides the input."""
    weight: torch.Tensor
    """[out, in], or [k, out, in] multiplied as [k out, in]; an fp32 leaf when fuse_wgrad."""
    scaling: Fp8LinearScaling
    """The layer's scale slots (input, weight, output gradient)."""
    cast_weight: Callable | None
    """weight2d -> Fp8Tensor (with its transpose), replacing scaling.weight.cast (fp8_linear)."""
    fuse_wgrad: bool
    """The weight gradient goes into weight.grad in the backward (accumulate_wgrad), not to autograd."""

    def cast(self, transpose: bool) -> Fp8Tensor:
        """The weight [out, in] in FP8; transpose: also W^T, which the input gradient reads."""
        weight2d = self.weight.view(-1, self.weight.shape[-1])  # [out, in] ([2, ffn, h] -> [2 ffn, h])
        if self.cast_weight is not None:
            return self.cast_weight(weight2d)
        return self.scaling.weight.cast(weight2d, transpose=transpose)


def forward_gemm(x: Fp8Tensor, w: Fp8Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [N, in] W [out, in]^T -> [N, out] in out_dtype (fast accumulation, as Transformer Engine)."""
    return _scaled_mm(x.data, w.data.t(), x.scale_inv, w.scale_inv, out_dtype, fast_accum=True)


def backward_gemms(grad: Fp8Tensor, w: Fp8Tensor, x_t: torch.Tensor | None, x_scale_inv: torch.Tensor | None,
                   grad_x_dtype: torch.dtype | None, side: Fp8Weight) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """From dY [N, out] in FP8 (with dY^T when x_t is given): (dX = dY W [N, in] in grad_x_dtype, or
    None when grad_x_dtype is None; dW = dY^T x in the weight's shape and dtype, or None when x_t
    is None or the gradient went into weight.grad). x_t: x^T [in, N] in FP8, from the forward."""
    grad_x = grad_w = None
    if grad_x_dtype is not None:  # [N, out] x [out, in] (W column-major = W^T row-major, transposed view)
        grad_x = _scaled_mm(grad.data, w.transposed().t(), grad.scale_inv, w.scale_inv, grad_x_dtype)
    if x_t is not None:  # [out, N] x [N, in] (x column-major = x^T row-major, transposed view)
        weight = side.weight
        if side.fuse_wgrad:
            accumulate_wgrad(weight, grad.transposed(), x_t, grad.scale_inv, x_scale_inv, side.scaling.wgrad_impl)
        else:
            grad_w = _scaled_mm(grad.transposed(), x_t.t(), grad.scale_inv, x_scale_inv, torch.float32)
            grad_w = grad_w.to(weight.dtype).view(weight.shape)
    return grad_x, grad_w


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, side: Fp8Weight, out_dtype: torch.dtype):
        x2d = x.reshape(-1, x.shape[-1])  # [N, in]
        check_shapes(x2d, weight.view(-1, weight.shape[-1]))
        wants_grad_x, wants_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # x^T is what the weight gradient reads, and W^T what the input gradient reads: both made
        # by the casts, in the same pass.
        x_fp8 = side.scaling.input.cast(x2d, transpose=wants_grad_w)
        w = side.cast(transpose=wants_grad_x)
        y = forward_gemm(x_fp8, w, out_dtype)  # [N, out]
        if wants_grad_w:
            ctx.save_for_backward(x_fp8.transposed(), x_fp8.scale_inv)  # [in, N]: x alone is not kept
        ctx.w, ctx.side, ctx.x_shape, ctx.x_dtype = w, side, x.shape, x.dtype
        return y.view(*x.shape[:-1], w.data.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        wants_grad_x, wants_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g2d = grad_y.reshape(-1, grad_y.shape[-1])  # [N, out]
        g = ctx.side.scaling.grad_output.cast(g2d, transpose=wants_grad_w)
        x_t, x_scale_inv = ctx.saved_tensors if wants_grad_w else (None, None)
        grad_x, grad_w = backward_gemms(g, ctx.w, x_t, x_scale_inv, ctx.x_dtype if wants_grad_x else None, ctx.side)
        return (None if grad_x is None else grad_x.view(ctx.x_shape)), grad_w, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scaling: Fp8LinearScaling, cast_weight=None,
               fuse_wgrad: bool = False) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T in FP8 (a [k, out, in] weight is multiplied as [k out, in]);
    output in the autocast dtype (else x's dtype). fuse_wgrad (weight an fp32 leaf): its gradient
    goes into weight.grad in the backward (accumulate_wgrad) instead of through autograd.
    cast_weight(weight) -> Fp8Tensor (the weight in FP8 with its scales and transpose) replaces
    `scaling.weight.cast`: a caller that runs several micro-batches on unchanged weights passes one
    that casts once (Transformer Engine's first-micro-batch rule; the weight's amax history then
    records once per step)."""
    return _Fp8Linear.apply(x, weight, Fp8Weight(weight, scaling, cast_weight, fuse_wgrad), autocast_dtype(x))


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on x returns: autocast's where it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
