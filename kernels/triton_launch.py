"""Launch geometry shared by the Triton kernels: block sizes, warps, and how many programs."""
from __future__ import annotations

import functools

import torch

# The most elements one program keeps in registers for a row-wise kernel (fp32); wider rows would spill.
MAX_ROW_BLOCK = 65536


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [rows, n] with unit stride along n: a view for row-strided tensors (the halves
    of a GEMM output, say), a copy otherwise."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one whole row of n_cols elements in registers."""
    block = next_power_of_2(n_cols)
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"rows of {n_cols} elements exceed the {MAX_ROW_BLOCK}-element row kernels; "
                         "use the 'reference' implementation for such widths.")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, work_items: int) -> int:
    """Programs for a kernel that loops over work items and writes one partial sum each: two per
    SM on CUDA (a second resident program hides the first one's load latency), a few under the
    CPU interpreter (which runs programs one after another)."""
    if device.type == "cuda":
        slots = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    else:
        slots = 4
    return max(1, min(work_items, slots))
