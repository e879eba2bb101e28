"""Triton SwiGLU: y = silu(gate) * up in one pass (fp32 math, one rounding to the output dtype).

The backward recomputes sigmoid(gate) from gate and up, so only the two inputs are saved (torch's
unfused graph also keeps silu(gate)). gate/up may be strided views such as the two halves of one
[.., 2 * ffn] GEMM output: rows are addressed with their own stride, columns must be contiguous.
"""
import torch
import triton
import triton.language as tl

from kernels.triton_launch import as_rows, next_power_of_2

BLOCK_COLS_MAX = 1024


@triton.jit
def _swiglu_forward(G, U, Y, stride_g, stride_u, stride_y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(G, U, DY, DG, DU, stride_g, stride_u, stride_dy, stride_dg, stride_du, n_cols,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    # silu'(g) = sig * (1 + g * (1 - sig))
    tl.store(DG + row * stride_dg + cols, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)


def _launch_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u [R, f] (unit column stride) -> y = silu(g) * u [R, f] in g's dtype."""
    y = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    grid, block = _grid(g)
    _swiglu_forward[grid](g, u, y, g.stride(0), u.stride(0), y.stride(0), g.shape[1], BLOCK=block)
    return y


def _launch_backward(g, u, dy, dg, du) -> None:
    """dg, du [R, f] <- the gradients of silu(g) * u given dy [R, f]."""
    grid, block = _grid(g)
    _swiglu_backward[grid](g, u, dy, dg, du, g.stride(0), u.stride(0), dy.stride(0), dg.stride(0), du.stride(0),
                           g.shape[1], BLOCK=block)


def _grid(rows: torch.Tensor) -> tuple[tuple[int, int], int]:
    block = min(next_power_of_2(rows.shape[1]), BLOCK_COLS_MAX)
    return (rows.shape[0], -(-rows.shape[1] // block)), block


class TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g, u = as_rows(gate), as_rows(up)
        ctx.save_for_backward(g, u)
        ctx.shape = gate.shape
        return _launch_forward(g, u).view(gate.shape)

    @staticmethod
    def backward(ctx, grad_y):
        g, u = ctx.saved_tensors
        dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        _launch_backward(g, u, as_rows(grad_y), dg, du)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu_halves_grad_rows(rows: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """rows [R, 2f] (gate, then up), grad_y [.., f] -> the gradient of silu(gate) * up with
    respect to rows, one [R, 2f] tensor in rows' dtype."""
    g, u = rows.chunk(2, dim=1)  # [R, f] views, row stride 2f
    grad = torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)  # [R, 2f]
    _launch_backward(g, u, as_rows(grad_y), *grad.chunk(2, dim=1))
    return grad


class TritonSwiGLUHalves(torch.autograd.Function):
    """gate_up [.., 2 * ffn] (gate, then up: one GEMM's output) -> silu(gate) * up [.., ffn]. The
    same kernels on the two halves as strided views; the backward writes dgate and dup into the
    halves of one [.., 2 * ffn] gradient, where chunking the output first would make autograd
    concatenate two separate gradients (7.5 ms of an FP8 7B-shape step on an H200)."""

    @staticmethod
    def forward(ctx, gate_up):
        rows = as_rows(gate_up)  # [R, 2f]
        y = _launch_forward(*rows.chunk(2, dim=1))  # [R, f]
        ctx.save_for_backward(rows)
        ctx.shape = gate_up.shape
        return y.view(*gate_up.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, grad_y):
        (rows,) = ctx.saved_tensors
        return swiglu_halves_grad_rows(rows, grad_y).view(ctx.shape)


def swiglu_halves_triton(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: gate_up's last dim must hold gate and up halves, got {gate_up.shape[-1]}.")
    return TritonSwiGLUHalves.apply(gate_up)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must match, got {tuple(gate.shape)} {gate.dtype} and "
                         f"{tuple(up.shape)} {up.dtype}.")
    return TritonSwiGLU.apply(gate, up)
