"""Per-tensor FP8 scaling: formats, scale from amax, saturating quantization, amax history.

A tensor x is stored in FP8 as q = saturate(x * scale) and read back as q / scale. The scale maps
the tensor's absolute maximum (amax) onto the format's largest finite value, divided by 2^margin
for headroom (Transformer Engine's convention):

    scale = fp8_max / amax / 2^margin        (scale = 1 while amax is 0, e.g. before any history)

Two recipes choose which amax:
  * delayed (TE's DelayedScaling): the max (or most recent) of the amaxes of the last
    `history_len` uses of this tensor slot; the current tensor's amax is appended after the cast,
    so the scale costs no extra pass over the data but lags one use behind.
  * tensorwise (current scaling): the amax of the tensor being cast, one extra reduction pass,
    no lag; values never saturate.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {name: torch.finfo(dtype).max for name, dtype in FP8_DTYPES.items()}  # 448, 57344
FORMATS = ("e4m3", "hybrid")
RECIPES = ("delayed", "tensorwise")
AMAX_ALGOS = ("max", "most_recent")


def element_format(fp8_format: str, is_gradient: bool) -> str:
    """hybrid = E4M3 (more mantissa) for activations/weights, E5M2 (more range) for gradients."""
    if fp8_format == "hybrid" and is_gradient:
        return "e5m2"
    return "e4m3"


FP32_MAX = torch.finfo(torch.float32).max


def scale_from_amax(amax: torch.Tensor, element: str, margin: int) -> torch.Tensor:
    """fp32 scale that maps amax to the format's max / 2^margin; 1 where amax is 0, NaN, infinite,
    or so small that the scale would overflow. Five small kernels: a layer casts three tensors per
    micro-batch, and on a GPU these launches, not their work, are what cost."""
    target = FP8_MAX[element] / 2.0 ** margin
    amax = amax.float()
    usable = (amax >= target / FP32_MAX) & (amax < float("inf"))  # NaN fails both
    return torch.where(usable, target / amax, 1.0)


def quantize_reference(x: torch.Tensor, scale: torch.Tensor, element: str) -> torch.Tensor:
    """Saturating cast x * scale -> FP8 (a plain .to() would turn overflows into NaN for e4m3)."""
    limit = FP8_MAX[element]
    return (x.float() * scale).clamp_(-limit, limit).to(FP8_DTYPES[element])


@functools.cache
def _fused_cast():
    """kernels.triton_fp8_cast on CUDA machines with Triton; None elsewhere (the torch ops serve).
    Imported on first use so that importing the model never imports Triton."""
    try:
        from kernels import triton_fp8_cast
    except ImportError:
        return None
    return triton_fp8_cast


def quantize(x: torch.Tensor, scale: torch.Tensor, element: str) -> torch.Tensor:
    """quantize_reference, in one pass on CUDA."""
    if x.is_cuda and _fused_cast() is not None:
        return _fused_cast().scaled_cast(x, scale, FP8_DTYPES[element], FP8_MAX[element], with_amax=False)[0]
    return quantize_reference(x, scale, element)


def quantize_with_amax(x: torch.Tensor, scale: torch.Tensor, element: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantize(x, scale), amax(|x|)) in one pass on CUDA, two elsewhere."""
    if x.is_cuda and _fused_cast() is not None:
        return _fused_cast().scaled_cast(x, scale, FP8_DTYPES[element], FP8_MAX[element], with_amax=True)
    return quantize_reference(x, scale, element), x.detach().abs().amax().float()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() / scale


@dataclass
class ScalingConfig:
    """How one FP8 linear layer picks its scales."""

    fp8_format: str = "hybrid"
    """e4m3 everywhere, or hybrid (e4m3 forward, e5m2 for gradients)."""
    recipe: str = "delayed"
    """delayed (amax history) or tensorwise (current amax)."""
    margin: int = 0
    """Scale down by 2^margin for headroom."""
    amax_history_len: int = 1024
    """Uses of a tensor slot remembered by delayed scaling."""
    amax_compute_algo: str = "max"
    """Delayed scaling's amax: max over the history, or the most recent entry."""


class TensorScaling:
    """The scale of one tensor slot (input, weight or output gradient) of one linear layer.

    Holds the amax history on the device of the first tensor it sees; not a module buffer, so
    `model.to(bfloat16)` never degrades it and checkpoints do not carry it (after a resume the
    history refills within one step; the first use falls back to current scaling)."""

    def __init__(self, config: ScalingConfig, is_gradient: bool):
        self.config = config
        self.element = element_format(config.fp8_format, is_gradient)
        self.history: torch.Tensor | None = None  # [amax_history_len] fp32 ring buffer
        self.newest = -1  # index of the newest entry of the ring
        self.uses = 0

    def cast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x -> (x in FP8, the fp32 scale it was cast with); records x's amax for delayed scales.

        Delayed scaling knows its scale before reading x, so on CUDA the cast and the amax are one
        fused pass (kernels.triton_fp8_cast); current scaling needs the amax first (two passes)."""
        if self.config.recipe == "tensorwise" or self.uses == 0:
            amax = x.detach().abs().amax().float()
            scale = scale_from_amax(amax, self.element, self.config.margin)
            x_fp8 = quantize(x, scale, self.element)
        else:
            scale = scale_from_amax(self._history_amax(), self.element, self.config.margin)
            x_fp8, amax = quantize_with_amax(x, scale, self.element)
        self._record(amax)
        return x_fp8, scale

    def _history_amax(self) -> torch.Tensor:
        if self.config.amax_compute_algo == "most_recent":
            return self.history[self.newest]
        return self.history.amax()  # unwritten slots hold 0, which never wins the max

    def _record(self, amax: torch.Tensor) -> None:
        """Overwrite the oldest entry (a ring: one copy kernel, where rolling the history would
        add a second kernel and an allocation per cast)."""
        if self.config.recipe != "delayed":
            return
        if self.history is None or self.history.device != amax.device:
            self.history = torch.zeros(self.config.amax_history_len, device=amax.device)
            self.newest = -1
        self.newest = (self.newest + 1) % self.config.amax_history_len
        self.history[self.newest].copy_(amax)
        self.uses += 1
