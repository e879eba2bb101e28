"""Triton RMSNorm: one program normalizes one row in registers (forward); the backward runs a few
persistent programs per SM that loop over rows and keep their share of the weight gradient in
registers, so dW costs one [programs, hidden] fp32 buffer instead of an [N, hidden] one.

Saved for backward: x and one fp32 rstd per row (the torch reference also keeps the normalized
fp32 copy of x). Statistics and arithmetic are fp32 whatever the input dtype. The same kernels
optionally fuse the residual add before the norm (h = x + delta, written alongside y) and, in the
backward, the residual gradient into the input gradient.
"""
import torch
import triton
import triton.language as tl

from kernels.triton_launch import as_rows, persistent_programs, row_block


@triton.jit
def _rms_norm_forward(X, DELTA, H, W, Y, RSTD, stride_x, stride_d, stride_h, stride_y, n_cols, eps,
                      HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:  # residual add first: h = x + delta, rounded to h's dtype as torch's add would be
        x = x + tl.load(DELTA + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
        h = x.to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h, mask=mask)
        x = h.to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward(DY, X, W, RSTD, DRES, DX, DW_PARTIAL, stride_dy, stride_x, stride_dres, stride_dx, n_rows,
                       n_cols, rows_per_program, HAS_RES_GRAD: tl.constexpr, BLOCK: tl.constexpr):
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
        if HAS_RES_GRAD:  # the gradient reaching the norm's input along the residual path
            dx += tl.load(DRES + row64 * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _forward(x, delta, weight, eps, out_dtype, h_dtype):
    """Launch the forward: (h rows or None, y [rows, n], rstd); h = x + delta when delta is given."""
    rows = as_rows(x)
    n_rows, n_cols = rows.shape
    block, num_warps = row_block(n_cols)
    y = torch.empty(rows.shape, dtype=out_dtype, device=rows.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    deltas = as_rows(delta) if delta is not None else rows
    h = torch.empty(rows.shape, dtype=h_dtype, device=rows.device) if delta is not None else rows
    _rms_norm_forward[(n_rows,)](rows, deltas, h, weight, y, rstd, rows.stride(0), deltas.stride(0), h.stride(0),
                                 y.stride(0), n_cols, eps, HAS_DELTA=delta is not None, BLOCK=block,
                                 num_warps=num_warps)
    return (h if delta is not None else None), y, rstd


def _backward(rows, weight, rstd, grad_y, grad_residual):
    """Launch the backward: (dx [rows, n] in rows' dtype, dweight); adds grad_residual into dx."""
    n_rows, n_cols = rows.shape
    block, num_warps = row_block(n_cols)
    grad_rows = as_rows(grad_y)
    residual = as_rows(grad_residual) if grad_residual is not None else grad_rows
    programs = persistent_programs(rows.device, n_rows)
    grad_x = torch.empty_like(rows)
    dw_partial = torch.empty(programs, n_cols, dtype=torch.float32, device=rows.device)
    _rms_norm_backward[(programs,)](
        grad_rows, rows, weight, rstd, residual, grad_x, dw_partial, grad_rows.stride(0), rows.stride(0),
        residual.stride(0), grad_x.stride(0), n_rows, n_cols, -(-n_rows // programs),
        HAS_RES_GRAD=grad_residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return grad_x, dw_partial.sum(0).to(weight.dtype)


class TritonRMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * weight over the last dim, stored as out_dtype (one
    rounding of the fp32 result, as a cast afterwards would give, without its extra pass)."""

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        _, y, rstd = _forward(x, None, weight, eps, out_dtype, None)
        ctx.save_for_backward(as_rows(x), weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = _backward(rows, weight, rstd, grad_y, None)
        return grad_x.view(grad_y.shape), grad_w, None, None


class TritonAddRMSNorm(torch.autograd.Function):
    """(h, y) = (x + delta, rms_norm(x + delta)): the residual add fused into the norm that
    follows it. The forward reads x and delta once and writes h and y; the backward adds the
    gradient arriving at h along the residual path into the norm's input gradient in the same
    pass (instead of autograd's separate add)."""

    @staticmethod
    def forward(ctx, x, delta, weight, eps, out_dtype):
        h_dtype = torch.result_type(x, delta)
        h, y, rstd = _forward(x, delta, weight, eps, out_dtype, h_dtype)
        ctx.save_for_backward(h, weight, rstd)
        ctx.dtypes = (x.dtype, delta.dtype)
        return h.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_h, grad_y):
        h, weight, rstd = ctx.saved_tensors
        grad, grad_w = _backward(h, weight, rstd, grad_y, grad_h)
        grad = grad.view(grad_y.shape)
        x_dtype, delta_dtype = ctx.dtypes
        # One tensor serves both inputs when their dtypes agree (autograd never adds into a
        # gradient it does not own alone).
        return grad.to(x_dtype), grad.to(delta_dtype), grad_w, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None):
    return TritonRMSNorm.apply(x, weight, eps, out_dtype or x.dtype)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                        out_dtype: torch.dtype | None = None):
    if x.shape != delta.shape:
        raise ValueError(f"add_rms_norm: x and delta must have the same shape, got {tuple(x.shape)} and "
                         f"{tuple(delta.shape)}.")
    return TritonAddRMSNorm.apply(x, delta, weight, eps, out_dtype or torch.result_type(x, delta))
