"""Where a fused kernel accumulates a weight's gradient in fp32 (gradient-accumulation fusion).

An fp32 weight's own `.grad` (made when None: the first micro-batch of a step writes, the others
add), or, for a low-precision parameter, the fp32 `main_grad` the distributed optimizer gives it
(Megatron-LM's name): a view of its gradient buffer, always there, so always added into
(megatron_code/parallel/distributed_optimizer.py, bf16 parameters with sharded fp32 master
weights). The fused linears, the embedding, the loss heads and the FP8 weight-gradient GEMMs all
write through `fp32_gradient`.
"""
from __future__ import annotations

from typing import Callable

import torch


def has_fp32_gradient(weight: torch.Tensor) -> bool:
    """A leaf whose gradient a fused kernel can accumulate in fp32."""
    return weight.is_leaf and (weight.dtype == torch.float32 or getattr(weight, "main_grad", None) is not None)


def fp32_gradient(weight: torch.Tensor,
                  make: Callable[[torch.Tensor], torch.Tensor] = torch.empty_like) -> tuple[torch.Tensor, bool]:
    """(the fp32 gradient tensor of `weight`'s shape, fresh): fresh when it was just made by
    `make` (empty_like: the caller writes rather than adds; zeros_like: the caller adds anyway)."""
    main = getattr(weight, "main_grad", None)
    if main is not None:
        return main, False
    fresh = weight.grad is None
    if fresh:
        weight.grad = make(weight)
    return weight.grad, fresh
