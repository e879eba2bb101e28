"""C (+)= scale_a * scale_b * (A B^T) with A [M, K] and B [N, K] in FP8 and C in fp32, in one pass:

the weight-gradient GEMM of an FP8 linear (A = dY^T, B = x^T, C = the fp32 master gradient) that
adds into the gradient in its epilogue, as Transformer Engine's cuBLASLt call does with beta = 1.
`torch._scaled_mm` cannot accumulate, so each micro-batch after the first wrote an fp32 [out, in]
product and autograd added it: a write and a read-read-write of every weight in fp32 per
micro-batch (32 ms of an H200 step of the 7B shape, docs/benchmarks.md).

Both operands are K-major (their rows run along the tokens), the layout Hopper's FP8 tensor-core
instructions read and the one the FP8 casts already write (kernels/triton_fp8_cast.py). Partial
sums are promoted to fp32 every BK products (`max_num_imprecise_acc`), as cuBLAS does for the
backward GEMMs without fast accumulation. Programs walk the output tiles in groups of GROUP_M row
blocks so that the programs running together reread the same rows of A from L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile shapes the autotuner tries on CUDA, per (M, N, K). The fp32 accumulator and the partial sum
# promoted every BK both live in registers: 2 BM BN / threads of them, at most 255 per thread. So
# 128x128 takes 8 warps (128 each, 190 in all compiled for sm_90a), and 128x256 or 256x128 would
# spill at 8 warps (255 + 264-376 stack bytes) and at 16 (128 + 232-256): `python
# benchmarks/triton_sass.py --kernels fp8_gemm` compiles them on any machine and shows it.
_CUDA_TILES = ((128, 128, 8, 4), (128, 128, 8, 3), (64, 256, 8, 4), (256, 64, 8, 4))  # BM, BN, warps, stages
# Under Triton's interpreter (CPU tests): small tiles, so edge tiles and several K steps are exercised.
INTERPRETER_TILE = {"BM": 32, "BN": 32, "BK": 32, "GROUP_M": 2}


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BK"] == 0})
@triton.jit
def _fp8_gemm_kernel(A, B, C, SCALE_A, SCALE_B, M, N, K, stride_a, stride_b, stride_c,
                     ACCUMULATE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    blocks_m, blocks_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    in_group = GROUP_M * blocks_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    # Rows and columns past the edge reread valid ones (mod) and are masked at the store, so the
    # loads along M and N need no mask.
    a_ptrs = A + (rows % M).to(tl.int64)[:, None] * stride_a + ks[None, :]  # [BM, BK]
    b_ptrs = B + (cols % N).to(tl.int64)[None, :] * stride_b + ks[:, None]  # [BK, BN]: B^T's tile
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            left = K - k * BK
            a = tl.load(a_ptrs, mask=ks[None, :] < left, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < left, other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BK)
        a_ptrs += BK
        b_ptrs += BK
    acc = acc * (tl.load(SCALE_A) * tl.load(SCALE_B))
    c_ptrs = C + rows.to(tl.int64)[:, None] * stride_c + cols[None, :]
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=inside, other=0.0)
    tl.store(c_ptrs, acc, mask=inside)


_tuned_fp8_gemm_kernel = triton.autotune(
    configs=[triton.Config({"BM": bm, "BN": bn, "BK": 128, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
             for bm, bn, warps, stages in _CUDA_TILES],
    key=["M", "N", "K", "ACCUMULATE"],
    restore_value=["C"],  # each timed trial adds into C: put it back between them
)(_fp8_gemm_kernel)


def fp8_gemm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
             accumulate: bool, tile: dict | None = None) -> torch.Tensor:
    """c [M, N] fp32 = (c if accumulate else 0) + scale_a * scale_b * a [M, K] @ b [N, K]^T, a and b
    in FP8 (e4m3 or e5m2, mixed allowed), rows of unit stride; scale_a, scale_b one-element fp32
    device tensors (the casts' dequantization scales). On CUDA the tile shape is tuned per shape
    (`tile` fixes one); under the interpreter INTERPRETER_TILE. Returns c."""
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k or c.shape != (m, n) or c.dtype != torch.float32:
        raise ValueError(f"fp8_gemm: expected a [M, K], b [N, K], c fp32 [M, N]; got a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}, c {c.dtype} {tuple(c.shape)}")
    if a.stride(1) != 1 or b.stride(1) != 1 or c.stride(1) != 1:
        raise ValueError("fp8_gemm: a, b and c need unit stride along their rows (K-major operands)")
    kernel = _fp8_gemm_kernel
    if tile is None and c.is_cuda:
        kernel = _tuned_fp8_gemm_kernel
    elif tile is None:
        tile = INTERPRETER_TILE
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    kernel[grid](a, b, c, scale_a, scale_b, m, n, k, a.stride(0), b.stride(0), c.stride(0),
                 ACCUMULATE=accumulate, **(tile or {}))
    return c
