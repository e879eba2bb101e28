"""Triton RMSNorm: one program normalizes one row in registers (forward); the backward runs a few
persistent programs per SM that loop over rows and keep their share of the weight gradient in
registers, so dW costs one [programs, hidden] fp32 buffer instead of an [N, hidden] one.

Saved for backward: x and one fp32 rstd per row (the torch reference also keeps the normalized
fp32 copy of x). Statistics and arithmetic are fp32 whatever the input dtype.
"""
import torch
import triton
import triton.language as tl

from kernels.triton_launch import as_rows, persistent_programs, row_block


@triton.jit
def _rms_norm_forward(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols,
                       rows_per_program, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program  # int64 bounds give an int64 loop index (large offsets)
    last = tl.minimum(first + rows_per_program, n_rows)
    for row64 in range(first, last):
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        x_hat = x * rstd
        dy_w = dy * w
        # d/dx of x * rstd(x): rstd * (dy_w - x_hat * mean(dy_w * x_hat))
        dx = (dy_w - x_hat * (tl.sum(dy_w * x_hat, axis=0) / n_cols)) * rstd
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


class TritonRMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dim, stored as out_dtype (one
    rounding of the fp32 result, as a cast afterwards would give, without its extra pass)."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        rows = as_rows(x)
        n_rows, n_cols = rows.shape
        block, num_warps = row_block(n_cols)
        y = torch.empty(rows.shape, dtype=out_dtype, device=rows.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _rms_norm_forward[(n_rows,)](rows, weight, y, rstd, rows.stride(0), y.stride(0), n_cols, eps,
                                     BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = rows.shape
        block, num_warps = row_block(n_cols)
        grad_rows = as_rows(grad_y)
        programs = persistent_programs(rows.device, n_rows)
        grad_x = torch.empty_like(rows)
        dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=rows.device)
        _rms_norm_backward[(programs,)](
            grad_rows, rows, weight, rstd, grad_x, dw_partial, grad_rows.stride(0), rows.stride(0),
            grad_x.stride(0), n_rows, n_cols, -(-n_rows // programs), BLOCK=block, num_warps=num_warps,
        )
        return grad_x.view(grad_y.shape), dw_partial.sum(0).to(weight.dtype), None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None):
    return TritonRMSNorm.apply(x, weight, eps, out_dtype or x.dtype)
