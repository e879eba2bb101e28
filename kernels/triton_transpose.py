"""Triton 2-D transpose for 1-byte (FP8) tensors: the FP8 GEMMs of Hopper take their first
operand row-major and their second column-major, so a linear layer's backward needs dY, x and W
transposed. torch's strided copy moves one byte per thread with scattered accesses (~340 GB/s on
an H200, docs/benchmarks.md); here each program loads a [BM, BN] tile with coalesced rows and
stores its transpose with coalesced rows. The data is moved as uint8: a transpose only moves bytes.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _transpose_tile(X, Y, M, N, stride_x, stride_y, BM: tl.constexpr, BN: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tile = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask)  # [BM, BN]
    out = Y + cols[:, None].to(tl.int64) * stride_y + rows[None, :]  # [BN, BM]: Y[c, r] = X[r, c]
    tl.store(out, tl.trans(tile), mask=tl.trans(mask))


def transpose_bytes(x: torch.Tensor) -> torch.Tensor:
    """x [M, N] (1-byte elements, unit stride along N) -> x.t().contiguous() [N, M]."""
    if x.dim() != 2 or x.element_size() != 1 or x.stride(1) != 1:
        raise ValueError(f"transpose_bytes takes a row-major 2-D tensor of 1-byte elements, got shape "
                         f"{tuple(x.shape)}, dtype {x.dtype}, strides {x.stride()}")
    m, n = x.shape
    y = torch.empty((n, m), dtype=x.dtype, device=x.device)
    block = 64
    grid = (triton.cdiv(m, block), triton.cdiv(n, block))
    _transpose_tile[grid](x.view(torch.uint8), y.view(torch.uint8), m, n, x.stride(0), y.stride(0),
                          BM=block, BN=block, num_warps=4)
    return y
