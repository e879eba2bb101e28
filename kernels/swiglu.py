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


def swiglu_halves_values(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2 * ffn] in fp32, [..., ffn]: what the FP8 kernels
    (kernels/fp8_swiglu.py) quantize, without a rounding to gate_up's dtype first."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_halves_grad_values(gate_up: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The gradient of silu(gate) * up with respect to gate_up [..., 2 * ffn], given grad_y
    [..., ffn], in fp32: d up = dy silu(g), d gate = dy up silu'(g) with
    silu'(g) = sig(g) (1 + g (1 - sig(g))) = sig(g) + silu(g) (1 - sig(g)). Written into the two
    halves of one tensor, with three [..., ffn] temporaries."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    dy = grad_y.float()
    grad = torch.empty(gate_up.shape, dtype=torch.float32, device=gate_up.device)
    d_gate, d_up = grad.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    torch.mul(dy, silu, out=d_up)
    silu_prime = torch.sub(1.0, sig).mul_(silu).add_(sig)
    torch.mul(dy, up, out=d_gate).mul_(silu_prime)
    return grad

