"""Per-tensor FP8 scaling: formats, scale from amax, saturating quantization, amax history.

A tensor x is stored in FP8 as q = saturate(x * scale) and read back as q / scale. The scale maps
the tensor's absolute maximum (amax) onto the format's largest finite value, divided by 2^margin
for headroom (Transformer Engine's convention):

    scale = fp8_max / amax / 2^margin        (scale = 1 while amax is 0, e.g. before any history)

Two recipes choose which amax:
  * delayed (TE's DelayedScaling): the max (or most recent) of the amaxes of the last
    `history_len` steps of this tensor slot (kernels.fp8_history); the current tensor's amax is
    recorded by the cast itself, so the scale costs no extra pass over the data but lags behind.
  * tensorwise (current scaling): the amax of the tensor being cast, one extra reduction pass,
    no lag; values never saturate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.dispatch import package_imports, triton_module
from kernels.fp8_history import AmaxHistories, scale_for_target

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


def scale_from_amax(amax: torch.Tensor, element: str, margin: int) -> torch.Tensor:
    """fp32 scale that maps amax to the format's max / 2^margin; 1 where amax is 0, NaN, infinite,
    or so small that the scale would overflow."""
    return scale_for_target(amax, FP8_MAX[element] / 2.0 ** margin)


def quantize(x: torch.Tensor, scale: torch.Tensor, element: str) -> torch.Tensor:
    """Saturating cast x * scale -> FP8 (a plain .to() would turn overflows into NaN for e4m3)."""
    limit = FP8_MAX[element]
    return (x.float() * scale).clamp_(-limit, limit).to(FP8_DTYPES[element])


def _triton_on(t: torch.Tensor) -> bool:
    """The Triton kernels serve CUDA tensors where Triton imports (imported on first use, so that
    importing the model never imports Triton); the torch ops serve elsewhere."""
    return t.is_cuda and package_imports("triton")


def cast_transpose(x2d: torch.Tensor, scale: torch.Tensor, element: str, transpose: bool,
                   amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(quantize(x2d, scale), its transpose [N, M] contiguous or None), folding max|x2d| into the
    fp32 cell `amax` when given: one pass over x2d on CUDA (kernels.triton_fp8_cast)."""
    if _triton_on(x2d):
        return triton_module("triton_fp8_cast").cast_transpose(x2d, scale, FP8_DTYPES[element], FP8_MAX[element],
                                                               transpose, amax)
    data = quantize(x2d, scale, element)
    if amax is not None:
        torch.maximum(amax, x2d.detach().abs().amax().float(), out=amax)
    return data, (data.t().contiguous() if transpose else None)


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


def transposed(t: torch.Tensor) -> torch.Tensor:
    """t.t().contiguous() for a 2-D FP8 tensor: the tiled Triton kernel on CUDA, torch elsewhere."""
    if _triton_on(t):
        return triton_module("triton_transpose").transpose_bytes(t)
    return t.t().contiguous()


class Fp8Tensor:
    """A 2-D tensor in FP8 with the scales it was cast with, and its transpose (made by the cast when
    asked for, else on first request: the backward GEMMs want the other layout)."""

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, scale_inv: torch.Tensor,
                 data_t: torch.Tensor | None = None):
        self.data, self.scale, self.scale_inv, self._data_t = data, scale, scale_inv, data_t

    def transposed(self) -> torch.Tensor:
        """data.t().contiguous() [N, M]."""
        if self._data_t is None:
            self._data_t = transposed(self.data)
        return self._data_t


class TensorScaling:
    """The scale of one tensor slot (input, weight or output gradient) of one linear layer: a row
    of an AmaxHistories shared by all the slots of a model (or owned, for a stand-alone layer)."""

    def __init__(self, config: ScalingConfig, is_gradient: bool, histories: AmaxHistories | None = None):
        self.config = config
        self.element = element_format(config.fp8_format, is_gradient)
        self.histories = histories if histories is not None else new_histories(config)
        self.slot = self.histories.add_slot(FP8_MAX[self.element] / 2.0 ** config.margin)

    @property
    def uses(self) -> int:
        """Casts recorded in this slot's history (delayed recipe)."""
        return self.histories.records[self.slot]

    def cast(self, x2d: torch.Tensor, transpose: bool = False) -> Fp8Tensor:
        """x2d [M, N] -> Fp8Tensor (with the transpose when asked); records x2d's amax for delayed
        scales. A delayed scale is known before reading x2d, so on CUDA the cast, the transpose and
        the amax are one pass; current scaling (and a slot's first cast) needs the amax first."""
        return self.cast_produced(lambda: x2d, lambda scale, amax: cast_transpose(x2d, scale, self.element, transpose, amax),
                                  transpose, x2d.device)

    def cast_produced(self, values, write_fp8, transpose: bool, device: torch.device) -> Fp8Tensor:
        """The cast of a tensor that its producing kernel can also write in FP8 itself (the fused
        SwiGLU, kernels/fp8_swiglu.py). values() -> the tensor [M, N] in a float dtype;
        write_fp8(scale, amax_cell) -> (data, data_t or None): the same cast written by the
        producer, max |value| folded into amax_cell. With a delayed scale (known before the
        tensor exists) the producer writes FP8 directly; current scaling, and a slot's first cast,
        need the amax of values() first. `device`: where the tensor is made."""
        histories, slot, element = self.histories, self.slot, self.element
        delayed = self.config.recipe == "delayed"
        if not delayed or not histories.initialized[slot]:
            x2d = values()
            amax = x2d.detach().abs().amax().float()
            scale = scale_from_amax(amax, element, self.config.margin)
            data, data_t = cast_transpose(x2d, scale, element, transpose)
            scaled = Fp8Tensor(data, scale, scale.reciprocal(), data_t)
            if delayed:
                histories.record(slot, amax)
        else:
            scale, scale_inv = (histories.cell(name, slot, device) for name in ("scale", "scale_inv"))
            if not histories.active:  # the advance below rewrites the cells; keep the ones used here
                scale, scale_inv = scale.clone(), scale_inv.clone()
            data, data_t = write_fp8(scale, histories.cell("pending", slot, device))
            histories.note(slot)
            scaled = Fp8Tensor(data, scale, scale_inv, data_t)
        if delayed and not histories.active:
            histories.advance(slot)
        return scaled


def new_histories(config: ScalingConfig) -> AmaxHistories:
    return AmaxHistories(config.amax_history_len, most_recent=config.amax_compute_algo == "most_recent")
