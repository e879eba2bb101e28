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
from kernels.swiglu import SWIGLU_IMPLS, swiglu_halves, swiglu_halves_grad_values, swiglu_halves_values


def swiglu_to_fp8(gate_up: torch.Tensor, scaling: TensorScaling, transpose: bool, impl: str) -> Fp8Tensor:
    """gate_up [N, 2f] (gate, then up) -> silu(gate) * up [N, f] cast by `scaling` (its transpose
    [f, N] too when asked), the amax recorded in scaling's slot."""
    return _cast_of_swiglu(
        gate_up, scaling, transpose, impl, fp32_values=lambda: swiglu_halves_values(gate_up),
        triton_values=lambda: swiglu_halves(gate_up, "triton"),
        triton_write=lambda *cast: triton_module("triton_fp8_swiglu").swiglu_cast_transpose(gate_up, *cast))


def swiglu_grad_to_fp8(gate_up: torch.Tensor, grad: torch.Tensor, scaling: TensorScaling, transpose: bool,
                       impl: str) -> Fp8Tensor:
    """The gradient of silu(gate) * up with respect to gate_up [N, 2f], given grad [N, f], cast by
    `scaling` (its transpose [2f, N] too when asked), the amax recorded in scaling's slot."""
    return _cast_of_swiglu(
        gate_up, scaling, transpose, impl, fp32_values=lambda: swiglu_halves_grad_values(gate_up, grad),
        triton_values=lambda: triton_module("triton_swiglu").swiglu_halves_grad_rows(gate_up, grad),
        triton_write=lambda *cast: triton_module("triton_fp8_swiglu").swiglu_grad_cast_transpose(gate_up, grad, *cast))


def _cast_of_swiglu(gate_up, scaling: TensorScaling, transpose: bool, impl: str, fp32_values, triton_values,
                    triton_write) -> Fp8Tensor:
    """scaling.cast_produced for a SwiGLU output: under 'triton' the kernel that writes FP8
    (triton_write(scale, fp8 dtype, limit, transpose, amax)) or, for current scaling, the one that
    writes gate_up's dtype (triton_values()); under 'reference' the fp32 values (fp32_values()),
    cast, or rounded to gate_up's dtype once, as the kernels round."""
    use_triton = select("swiglu", impl, gate_up.device, SWIGLU_IMPLS) == "triton"
    element = scaling.element

    def write_fp8(scale, amax):
        if use_triton:
            return triton_write(scale, FP8_DTYPES[element], FP8_MAX[element], transpose, amax)
        return cast_transpose(fp32_values(), scale, element, transpose, amax)

    def values():
        return triton_values() if use_triton else fp32_values().to(gate_up.dtype)

    return scaling.cast_produced(values, write_fp8, transpose, gate_up.device)
