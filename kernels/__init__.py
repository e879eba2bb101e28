"""Kernels the model calls through one function each.

Every op here has a plain-torch reference implementation that runs anywhere (CPU included) and
is the numerical ground truth for tests; fused Triton/CUDA versions dispatch from the same
function when the device and installed packages allow, and fall back to the reference otherwise.
"""
from kernels.cross_entropy import cross_entropy
from kernels.rmsnorm import rms_norm
from kernels.rotary import apply_rotary_emb, rotate_half

__all__ = ["cross_entropy", "rms_norm", "apply_rotary_emb", "rotate_half"]
