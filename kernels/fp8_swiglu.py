"""SwiGLU whose output (forward) and input gradient (backward) come out in FP8, for the FP8 GEMMs
on either side of it (kernels/fp8_mlp.py):

    forward   gate_up [N, 2f] -> silu(gate) * up       in FP8 (+ transpose): linear_fc2's input
    backward  dA [N, f]       -> d gate_up [N, 2f]     in FP8 (+ transpose): linear_fc1's output gradient

With a delayed scale the SwiGLU kernel quantizes its fp32 result itself (kernels/triton_fp8_swiglu.py
under 'triton'; 'reference' computes the same in torch): the activation and its gradient never exist
in bf16. Current scaling needs their amax before the cast, so there they are made in gate_up's dtype
and cast (TensorScaling.cast_produced).
"""
from __future__ import annotations

import torch

from kernels.dispatch import select, triton_module
from kernels.fp8_scaling import FP8_DTYPES, FP8_MAX, Fp8Tensor, TensorScaling, cast_transpose
from kernels.swiglu import (
    SWIGLU_IMPLS, swiglu_halves, swiglu_halves_grad, swiglu_halves_grad_values, swiglu_halves_values,
)


def _uses_triton(t: torch.Tensor, impl: str) -> bool:
    return select("swiglu", impl, t.device, SWIGLU_IMPLS) == "triton"


def swiglu_to_fp8(gate_up: torch.Tensor, scaling: TensorScaling, transpose: bool, impl: str) -> Fp8Tensor:
    """gate_up [N, 2f] (gate, then up) -> silu(gate) * up [N, f] cast by `scaling` (its transpose
    [f, N] too when asked), the amax recorded in scaling's slot."""
    element = scaling.element

    def write_fp8(scale, amax):
        if _uses_triton(gate_up, impl):
            return triton_module("triton_fp8_swiglu").swiglu_cast_transpose(
                gate_up, scale, FP8_DTYPES[element], FP8_MAX[element], transpose, amax)
        return cast_transpose(swiglu_halves_values(gate_up), scale, element, transpose, amax)

    def values():  # fp32 math, one rounding to gate_up's dtype, as the kernels
        if _uses_triton(gate_up, impl):
            return swiglu_halves(gate_up, "triton")
        return swiglu_halves_values(gate_up).to(gate_up.dtype)

    return scaling.cast_produced(values, write_fp8, transpose, gate_up.device)


def swiglu_grad_to_fp8(gate_up: torch.Tensor, grad: torch.Tensor, scaling: TensorScaling, transpose: bool,
                       impl: str) -> Fp8Tensor:
    """The gradient of silu(gate) * up with respect to gate_up [N, 2f], given grad [N, f], cast by
    `scaling` (its transpose [2f, N] too when asked), the amax recorded in scaling's slot."""
    element = scaling.element

    def write_fp8(scale, amax):
        if _uses_triton(gate_up, impl):
            return triton_module("triton_fp8_swiglu").swiglu_grad_cast_transpose(
                gate_up, grad, scale, FP8_DTYPES[element], FP8_MAX[element], transpose, amax)
        return cast_transpose(swiglu_halves_grad_values(gate_up, grad), scale, element, transpose, amax)

    return scaling.cast_produced(lambda: swiglu_halves_grad(gate_up, grad, impl), write_fp8, transpose,
                                 gate_up.device)
