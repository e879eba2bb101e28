"""Triton per-chunk reductions for kernels/linear_cross_entropy.py.

One program per token row streams over the row's logits (in the GEMM's dtype, bf16 under
autocast) in blocks: the forward keeps an online max / rescaled sum of exp and picks the target
logit; the backward overwrites the logits in place with (softmax - onehot) * grad_loss, ready for
the two gradient GEMMs. No fp32 copy of the chunk is made; all arithmetic is fp32.
"""
import torch
import triton
import triton.language as tl

BLOCK_VOCAB = 4096


@triton.jit
def _row_stats(LOGITS, TARGETS, MAX, SUM_EXP, TARGET_LOGIT, stride, n_cols, n_valid, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    row_max = float("-inf")
    sum_exp = 0.0
    for start in range(0, n_valid, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing seen yet: keep the sum at 0
        sum_exp = sum_exp * tl.exp(row_max - shift) + tl.sum(tl.exp(x - shift), axis=0)
        row_max = new_max
    target = tl.load(TARGETS + row)
    here = (target >= 0) & (target < n_cols)
    t = tl.where(here, target, 0)
    x_t = tl.load(base + t, mask=here, other=0.0).to(tl.float32)
    x_t = tl.where(t < n_valid, x_t, float("-inf"))  # a padded id as target has probability 0
    tl.store(MAX + row, row_max)
    tl.store(SUM_EXP + row, sum_exp)
    tl.store(TARGET_LOGIT + row, tl.where(here, x_t, 0.0))


@triton.jit
def _row_grad(LOGITS, TARGETS, LSE, GRAD_LOSS, stride, n_cols, n_valid, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    target = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    g = tl.load(GRAD_LOSS + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - lse)
        p = tl.where(cols == target, p - 1.0, p)
        tl.store(base + cols, (p * g).to(LOGITS.dtype.element_ty), mask=cols < n_cols)


def _block(n_cols: int) -> int:
    return min(BLOCK_VOCAB, triton.next_power_of_2(max(n_cols, 1)))


class TritonChunkOps:
    """Same contract as kernels.linear_cross_entropy.TorchChunkOps."""

    @staticmethod
    def stats(logits, targets, valid, keep_logits: bool = False):
        """The logits are only read (keep_logits changes nothing here)."""
        rows, cols = logits.shape
        out = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
        _row_stats[(rows,)](logits, targets, out[0], out[1], out[2], logits.stride(0), cols, valid,
                            BLOCK=_block(cols), num_warps=8)
        return out[0], out[1], out[2]

    @staticmethod
    def grad(logits, targets, valid, lse, grad_loss):
        rows, cols = logits.shape
        _row_grad[(rows,)](logits, targets, lse, grad_loss, logits.stride(0), cols, valid, BLOCK=_block(cols),
                           num_warps=8)
        return logits
