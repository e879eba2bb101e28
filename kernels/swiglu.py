"""SwiGLU activation: silu(gate) * up (the MLP's nonlinearity between linear_fc1 and linear_fc2).

`swiglu(..., impl=)` picks the plain-torch reference or the Triton kernel (kernels/triton_swiglu.py)
through kernels/dispatch.py; `swiglu_halves` takes gate and up as the two halves of one tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.dispatch import select, triton_module

SWIGLU_IMPLS = ("auto", "triton", "reference")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """gate, up [..., ffn] (same shape and dtype) -> silu(gate) * up."""
    if select("swiglu", impl, gate.device, SWIGLU_IMPLS) == "triton":
        return triton_module("triton_swiglu").swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


def swiglu_halves(gate_up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """gate_up [..., 2 * ffn] (gate, then up: one GEMM's output) -> silu(gate) * up [..., ffn].
    With Triton the gradient comes back as one [..., 2 * ffn] tensor, without a concatenation."""
    if select("swiglu", impl, gate_up.device, SWIGLU_IMPLS) == "triton":
        return triton_module("triton_swiglu").swiglu_halves_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_reference(gate, up)
