"""Triton AdamW: one launch steps many parameters, each element read once (parameter, gradient,
both moments) and written once (parameter, both moments): 28 bytes per fp32 element, the least an
AdamW step can move; clipping included. Optionally the step also writes the updated parameter's
low-precision copy (2 more bytes), the bf16 weight the next training step's GEMMs read, which
saves that step the cast (6 bytes: read fp32, write bf16).

torch's fused AdamW moves the same 28 bytes but reached ~60% of HBM bandwidth on an H200
(docs/benchmarks.md); its multi-tensor launcher walks 64 K-element chunks with four elements per
thread. Here every program streams one contiguous BLOCK of one tensor. The tensors of a launch
come as a table of device addresses (`TABLE`, one row per tensor) and every program finds its
tensor in `OWNER` (one entry per program): a handful of launches per step, whatever the number of
parameters, as apex's and torch's multi-tensor apply do.

The math is torch.optim.AdamW's (decoupled weight decay, bias corrections), in fp32 whatever the
storage dtype: g = grad / grad_scale; p *= 1 - lr * wd; m = lerp(m, g, 1 - beta1);
v = beta2 * v + (1 - beta2) * g^2; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
"""
from __future__ import annotations

import functools
from collections import defaultdict
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 8
# TABLE's columns: the tensors' addresses (0: no copy), then the element count.
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, COPY, NUMEL = range(6)
TABLE_COLUMNS = 6
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class AdamWTensors(NamedTuple):
    """One parameter's operands: contiguous, of one shape. `copy` (or None) receives the updated
    parameter in its own dtype."""
    param: torch.Tensor
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    copy: torch.Tensor | None = None


@triton.jit
def _operand(row, column: tl.constexpr, like, ALIGNED: tl.constexpr):
    """The address in the table row's `column` as a pointer of `like`'s type. The compiler cannot
    see where a loaded address points: ALIGNED (every address of the launch 16-byte aligned, every
    element count a multiple of 16, checked on the host) tells it, so that it may vectorize."""
    pointer = tl.load(row + column).to(like.dtype)
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _adamw_multi_tensor(TABLE, OWNER, FIRST_BLOCK, SCALE, P_AS, G_AS, S_AS, C_AS, beta1, beta2, eps, decay, step_size,
                        bc2_sqrt, HAS_SCALE: tl.constexpr, HAS_COPY: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK: tl.constexpr):
    # P_AS, G_AS, S_AS, C_AS: the first tensor's parameter, gradient, moment and copy, passed only
    # for their pointer types (every tensor of a launch shares them), which the table's addresses become.
    pid = tl.program_id(0)
    tensor = tl.load(OWNER + pid).to(tl.int64)
    row = TABLE + tensor * 6
    n = tl.load(row + 5)
    if ALIGNED:
        n = tl.multiple_of(n, 16)
    offsets = (pid - tl.load(FIRST_BLOCK + tensor)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    P = _operand(row, 0, P_AS, ALIGNED)
    G = _operand(row, 1, G_AS, ALIGNED)
    M = _operand(row, 2, S_AS, ALIGNED)
    V = _operand(row, 3, S_AS, ALIGNED)
    p = tl.load(P + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offsets, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offsets, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(SCALE).to(tl.float32)
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)  # lerp(m, g, 1 - beta1), as torch writes it
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
    tl.store(P + offsets, p.to(P_AS.dtype.element_ty), mask=mask)
    tl.store(M + offsets, m.to(S_AS.dtype.element_ty), mask=mask)
    tl.store(V + offsets, v.to(S_AS.dtype.element_ty), mask=mask)
    if HAS_COPY:
        C = _operand(row, 4, C_AS, ALIGNED)
        tl.store(C + offsets, p.to(C_AS.dtype.element_ty), mask=mask)


def adamw_step_(tensors: Sequence[AdamWTensors], *, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, step: int, grad_scale: torch.Tensor | None = None) -> None:
    """One AdamW step, in place, of parameters that share hyperparameters and step count (`step`
    counts this step: 1 on the first); one launch per combination of dtypes (and with or without
    copies). grad_scale: a one-element tensor every gradient is divided by (clipping), or None."""
    launches: dict[tuple, list[AdamWTensors]] = defaultdict(list)
    for t in tensors:
        _check_operands(t)
        if t.param.numel():
            launches[_dtypes(t)].append(t)
    scalars = dict(beta1=beta1, beta2=beta2, eps=eps, decay=1.0 - lr * weight_decay,
                   step_size=lr / (1.0 - beta1 ** step), bc2_sqrt=(1.0 - beta2 ** step) ** 0.5)
    for launch in launches.values():
        first = launch[0]
        owner, first_block = block_owners(first.param.device, tuple(t.param.numel() for t in launch))
        scale = grad_scale if grad_scale is not None else owner  # any pointer; unread without HAS_SCALE
        table, aligned = address_table(launch)
        _adamw_multi_tensor[(owner.numel(),)](
            table, owner, first_block, scale, first.param, first.grad, first.exp_avg,
            first.param if first.copy is None else first.copy, **scalars, HAS_SCALE=grad_scale is not None,
            HAS_COPY=first.copy is not None, ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS)


def _dtypes(t: AdamWTensors) -> tuple:
    return t.param.dtype, t.grad.dtype, t.exp_avg.dtype, None if t.copy is None else t.copy.dtype


def _check_operands(t: AdamWTensors) -> None:
    """The kernel indexes every operand as one flat array of the parameter's size, in DTYPES."""
    operands = [t.param, t.grad, t.exp_avg, t.exp_avg_sq] + ([] if t.copy is None else [t.copy])
    for name, x in zip(AdamWTensors._fields, operands):
        if x.shape != t.param.shape or not x.is_contiguous() or x.dtype not in DTYPES or x.device != t.param.device:
            raise ValueError(f"AdamW operand {name}: expected a contiguous {tuple(t.param.shape)} tensor "
                             f"on {t.param.device} in one of {list(DTYPES)}, got {tuple(x.shape)} {x.dtype} "
                             f"on {x.device} (contiguous: {x.is_contiguous()})")
    if t.exp_avg_sq.dtype != t.exp_avg.dtype:
        raise ValueError(f"AdamW moments in different dtypes: {t.exp_avg.dtype} and {t.exp_avg_sq.dtype}")


def address_table(tensors: Sequence[AdamWTensors]) -> tuple[torch.Tensor, bool]:
    """([len(tensors), 6] int64 on their device: each row the operands' addresses (0 for no copy)
    and the element count; whether every address is 16-byte aligned and every count a multiple of
    16 (the kernel's ALIGNED). Rebuilt every step: in a single process the gradients are new
    tensors after zero_grad (with data parallelism they are views of the reducers' flat buffers).
    Separately allocated tensors are aligned, and so are GradientReducer's views (their offsets are
    multiples of 64 elements); ZeRO-1's pieces may not be (a shard can cut a parameter anywhere)."""
    rows = [[t.param.data_ptr(), t.grad.data_ptr(), t.exp_avg.data_ptr(), t.exp_avg_sq.data_ptr(),
             0 if t.copy is None else t.copy.data_ptr(), t.param.numel()] for t in tensors]
    aligned = all(value % 16 == 0 for row in rows for value in row)
    return torch.tensor(rows, dtype=torch.int64).to(tensors[0].param.device, non_blocking=True), aligned


@functools.lru_cache(maxsize=32)
def block_owners(device: torch.device, numels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner [programs] int32: the tensor each program steps, first_block [tensors] int64: its
    first program) for tensors of these sizes; the same every step, so made once."""
    blocks = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
    first_block = torch.cumsum(blocks, 0) - blocks
    owner = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks)
    return owner.to(device), first_block.to(device)
