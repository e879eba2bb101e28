"""Kernels the model calls through one function each.

Every op here has a plain-torch reference implementation that runs anywhere (CPU included) and
is the numerical ground truth for tests; fused Triton/CUDA versions are chosen per call by the
`impl` argument (kernels/dispatch.py: auto, triton, reference, and te/apex where they exist).
Triton kernel modules (kernels/triton_*.py) are imported on first use only.
"""
from kernels.cross_entropy import cross_entropy
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.rmsnorm import rms_norm
from kernels.rotary import apply_rotary_emb, apply_rotary_emb_qk, rotate_half
from kernels.swiglu import swiglu

__all__ = ["cross_entropy", "linear_cross_entropy", "rms_norm", "apply_rotary_emb", "apply_rotary_emb_qk",
           "rotate_half", "swiglu"]
