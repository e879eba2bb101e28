"""Collectives with the gradients tensor parallelism needs (Megatron-LM's "mappings").

Each forward collective is paired with its adjoint in backward:

| function                       | forward                 | backward                |
| copy_to_tensor_parallel        | identity                | all-reduce              |
| reduce_from_tensor_parallel    | all-reduce              | identity                |
| gather_sequence_parallel       | all-gather along dim 0  | reduce-scatter dim 0    |
| reduce_scatter_sequence_parallel | reduce-scatter dim 0  | all-gather along dim 0  |
| scatter_sequence_parallel      | keep own chunk of dim 0 | all-gather along dim 0  |

Activations are [s, b, h], so the sequence dimension is dim 0 and every gather/scatter works on
contiguous memory. All are identities for a group of one rank. Plain torch.distributed collectives
are used (not functional collectives): see ARCHITECTURE.md on gloo exit aborts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty((_size(group) * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    size = _size(group)
    if x.shape[0] % size:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the TP size {size}")
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def _own_chunk_dim0(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(_size(group), dim=0)[dist.get_rank(group)].contiguous()


def _identity(x: torch.Tensor, group) -> torch.Tensor:
    return x


def _collective(name: str, forward, backward) -> type:
    """An autograd Function computing forward(x, group) whose backward is backward(grad, group)."""

    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.group), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_CopyToTP = _collective("_CopyToTP", _identity, _all_reduce)
_ReduceFromTP = _collective("_ReduceFromTP", _all_reduce, _identity)
_GatherSP = _collective("_GatherSP", _all_gather_dim0, _reduce_scatter_dim0)
_ReduceScatterSP = _collective("_ReduceScatterSP", _reduce_scatter_dim0, _all_gather_dim0)
_ScatterSP = _collective("_ScatterSP", _own_chunk_dim0, _all_gather_dim0)


def _apply(fn, x, group):
    return x if _size(group) == 1 else fn.apply(x, group)


def copy_to_tensor_parallel(x, group):
    return _apply(_CopyToTP, x, group)


def reduce_from_tensor_parallel(x, group):
    return _apply(_ReduceFromTP, x, group)


def gather_sequence_parallel(x, group):
    return _apply(_GatherSP, x, group)


def reduce_scatter_sequence_parallel(x, group):
    return _apply(_ReduceScatterSP, x, group)


def scatter_sequence_parallel(x, group):
    return _apply(_ScatterSP, x, group)
