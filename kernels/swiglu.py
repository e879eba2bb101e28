"""SwiGLU activation: silu(gate) * up (the MLP's nonlinearity between linear_fc1 and linear_fc2).

`swiglu(..., impl=)` picks the plain-torch reference or the Triton kernel (kernels/triton_swiglu.py)
through kernels/dispatch.py.
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
