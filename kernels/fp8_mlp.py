"""The SwiGLU MLP's local GEMMs in FP8 as one autograd function (Transformer Engine's LayerNormMLP
without the norm):

    forward   gate_up = x W1^T          (FP8 GEMM, x cast with its transpose)
              a       = silu(gate) * up  written in FP8 by the SwiGLU kernel (kernels/fp8_swiglu.py)
              y       = a W2^T          (FP8 GEMM)
    backward  dA      = dY W2            (FP8 GEMM; dW2 = dY^T a from a^T)
              dGU     = SwiGLU'(gate_up) dA   written in FP8 by the SwiGLU backward kernel
              dX      = dGU W1, dW1 = dGU^T x

As two FP8 linears around a SwiGLU (kernels/fp8_linear.py), the activation and the gate/up
gradient would be written in bf16 and read back by the casts of the GEMMs that consume them; here
the SwiGLU kernels write the FP8 operands (and their transposes) directly. Saved for the backward,
as unfused: x^T and a^T in FP8 and gate_up in its dtype. Tensor parallelism stays outside: x is
this rank's (gathered) input, y its partial output.
"""
from __future__ import annotations

import torch

from kernels.fp8_linear import Fp8Weight, check_shapes, autocast_dtype, backward_gemms, forward_gemm
from kernels.fp8_swiglu import swiglu_grad_to_fp8, swiglu_to_fp8


class _Fp8SwiGLUMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, fc1: Fp8Weight, fc2: Fp8Weight, out_dtype: torch.dtype, swiglu_impl: str):
        x2d = x.reshape(-1, x.shape[-1])  # [N, h]
        check_shapes(x2d, w1.view(-1, w1.shape[-1]))
        check_shapes(x2d, w2)
        wants_x, wants_w1, wants_w2 = ctx.needs_input_grad[:3]
        through_fc1 = wants_x or wants_w1  # the backward goes on past the SwiGLU
        x_fp8 = fc1.scaling.input.cast(x2d, transpose=wants_w1)
        w1_fp8 = fc1.cast(transpose=wants_x)  # [2f, h]
        gate_up = forward_gemm(x_fp8, w1_fp8, out_dtype)  # [N, 2f]
        act = swiglu_to_fp8(gate_up, fc2.scaling.input, transpose=wants_w2, impl=swiglu_impl)  # [N, f]
        w2_fp8 = fc2.cast(transpose=through_fc1)  # [h, f]
        y = forward_gemm(act, w2_fp8, out_dtype)  # [N, h]
        ctx.save_for_backward(x_fp8.transposed() if wants_w1 else None, x_fp8.scale_inv,
                              gate_up if through_fc1 else None, act.transposed() if wants_w2 else None, act.scale_inv)
        ctx.weights, ctx.sides, ctx.x_shape, ctx.x_dtype = (w1_fp8, w2_fp8), (fc1, fc2), x.shape, x.dtype
        ctx.swiglu_impl = swiglu_impl
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        wants_x, wants_w1, wants_w2 = ctx.needs_input_grad[:3]
        x_t, x_scale_inv, gate_up, act_t, act_scale_inv = ctx.saved_tensors
        (w1_fp8, w2_fp8), (fc1, fc2) = ctx.weights, ctx.sides
        through_fc1 = wants_x or wants_w1
        g2d = grad_y.reshape(-1, grad_y.shape[-1])  # [N, h]
        g = fc2.scaling.grad_output.cast(g2d, transpose=wants_w2)
        grad_act, grad_w2 = backward_gemms(g, w2_fp8, act_t, act_scale_inv,
                                           gate_up.dtype if through_fc1 else None, fc2)  # dA [N, f]
        grad_x = grad_w1 = None
        if through_fc1:
            grad_gate_up = swiglu_grad_to_fp8(gate_up, grad_act, fc1.scaling.grad_output, transpose=wants_w1,
                                              impl=ctx.swiglu_impl)  # [N, 2f]
            grad_x, grad_w1 = backward_gemms(grad_gate_up, w1_fp8, x_t, x_scale_inv,
                                             ctx.x_dtype if wants_x else None, fc1)
        return (None if grad_x is None else grad_x.view(ctx.x_shape)), grad_w1, grad_w2, None, None, None, None


def fp8_swiglu_mlp(x: torch.Tensor, fc1: Fp8Weight, fc2: Fp8Weight, swiglu_impl: str = "auto") -> torch.Tensor:
    """x [..., h] -> silu(x W_gate^T) * (x W_up^T) W2^T [..., h] in FP8 (fc1.weight [2, f, h]:
    gate then up; fc2.weight [h, f]); output in the autocast dtype (else x's dtype)."""
    if fc1.weight.dim() != 3 or fc1.weight.shape[0] != 2:
        raise ValueError(f"fp8_swiglu_mlp: fc1's weight must be [2, ffn, hidden] (gate, up), got {tuple(fc1.weight.shape)}")
    return _Fp8SwiGLUMLP.apply(x, fc1.weight, fc2.weight, fc1, fc2, autocast_dtype(x), swiglu_impl)
