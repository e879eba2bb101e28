"""y = x W^T with all three GEMMs of a linear layer in FP8 through `torch._scaled_mm`.

    forward  y  = x  W^T :  x (e4m3) [N, in]   x  W (e4m3) [out, in]^T  -> [N, out]
    dgrad    dx = dy W   :  dy (e5m2 under hybrid) [N, out] x W [out, in] -> [N, in]
    wgrad    dW = dy^T x :  dy^T [out, N]        x  x [N, in]             -> [out, in]

Each operand is cast with its own per-tensor scale (kernels.fp8_scaling) and the product is
rescaled by 1 / (scale_a * scale_b) inside the GEMM; accumulation is fp32 and the output has the
compute dtype (bf16 under autocast). The forward keeps x and W in FP8 for the backward, halving
the saved-activation bytes of a bf16 linear. `_scaled_mm` wants its first operand row-major and
its second column-major, hence the transposed copies in the backward; on CUDA every dimension must
be a multiple of 16 (checked, with the fix named).
"""
from __future__ import annotations

import torch

from kernels.dispatch import package_imports, triton_module
from kernels.fp8_scaling import ScalingConfig, TensorScaling


class Fp8LinearScaling:
    """The three scale slots of one FP8 linear layer (input, weight, output gradient)."""

    def __init__(self, config: ScalingConfig):
        self.config = config
        self.input = TensorScaling(config, is_gradient=False)
        self.weight = TensorScaling(config, is_gradient=False)
        self.grad_output = TensorScaling(config, is_gradient=True)


def _check_shapes(x2d: torch.Tensor, weight: torch.Tensor) -> None:
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


def _scaled_mm(a_fp8, b_fp8_colmajor, scale_a, scale_b, out_dtype):
    # scale_a/scale_b of _scaled_mm multiply the FP8 operands back (dequantization scales).
    return torch._scaled_mm(a_fp8, b_fp8_colmajor, scale_a=scale_a.reciprocal(),
                            scale_b=scale_b.reciprocal(), out_dtype=out_dtype)


def transposed(t: torch.Tensor) -> torch.Tensor:
    """t.t().contiguous() for a 2-D FP8 tensor: the tiled Triton kernel on CUDA, torch elsewhere."""
    if t.is_cuda and package_imports("triton"):
        return triton_module("triton_transpose").transpose_bytes(t)
    return t.t().contiguous()


class Fp8Tensor:
    """A 2-D tensor cast to FP8 with its scale, and its transpose, made on first request: cached
    with the weight's per-step cast, the transposed weight the input gradient needs is made once
    per step rather than once per micro-batch."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor):
        self.data, self.scale = data, scale
        self._transposed: torch.Tensor | None = None

    def transposed(self) -> torch.Tensor:
        if self._transposed is None:
            self._transposed = transposed(self.data)
        return self._transposed


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scaling: Fp8LinearScaling, out_dtype: torch.dtype, cast_weight):
        x2d = x.reshape(-1, x.shape[-1])  # [N, in]
        _check_shapes(x2d, weight)
        x_fp8, x_scale = scaling.input.cast(x2d)
        w = cast_weight(weight) if cast_weight is not None else Fp8Tensor(*scaling.weight.cast(weight))
        y = _scaled_mm(x_fp8, w.data.t(), x_scale, w.scale, out_dtype)  # [N, out]
        ctx.save_for_backward(x_fp8, x_scale)
        ctx.w, ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.w_dtype = w, scaling, x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x_fp8, x_scale = ctx.saved_tensors
        w = ctx.w
        g2d = grad_y.reshape(-1, grad_y.shape[-1])  # [N, out]
        g_fp8, g_scale = ctx.scaling.grad_output.cast(g2d)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # [N, out] x [out, in] (W column-major = W^T contiguous, transposed)
            grad_x = _scaled_mm(g_fp8, w.transposed().t(), g_scale, w.scale, ctx.x_dtype)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # [out, N] x [N, in] (x column-major = x^T contiguous, transposed)
            grad_w = _scaled_mm(transposed(g_fp8), transposed(x_fp8).t(), g_scale, x_scale,
                                torch.float32).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scaling: Fp8LinearScaling, cast_weight=None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T in FP8; output in the autocast dtype (else x's dtype).
    cast_weight(weight) -> Fp8Tensor (the weight in FP8, its scale) replaces `scaling.weight.cast`: a caller that
    runs several micro-batches on unchanged weights passes one that casts once (Transformer
    Engine's first-micro-batch rule; the weight's amax history then advances once per step)."""
    out_dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        out_dtype = torch.get_autocast_dtype(x.device.type)
    return _Fp8Linear.apply(x, weight, scaling, out_dtype, cast_weight)
