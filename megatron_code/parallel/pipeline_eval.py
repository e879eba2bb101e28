"""Forward-only passes through pipeline stages of any placement, for validation.

Each micro-batch goes through the stages in order, one stage at a time: the rank that owns a stage
receives its input from the previous stage's rank (or takes it from its own previous stage), runs
it, and sends the output on. torch.distributed.pipelining's `eval()` of the V-shaped schedules
(zbv, dualpipev) fails in torch 2.13: it still runs the backward hand-off between a rank's two
stages ("can't steal_bwd_input if this stage doesn't have backward"). Validation runs every few
hundred steps, so it does without the schedules' overlap. Every rank walks the same global stage
order, so each send meets its receive and nothing deadlocks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

# What one stage hands the next: (hidden [s, b, h], position_ids [b, s], segment_ids [b, s]).
_HANDED_ON = 3
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32)
_HEADER = 8  # ndim, dtype code, up to 6 sizes


def _send(tensors, dst: int, group) -> None:
    """Each tensor with a header that lets the receiver allocate it."""
    for t in tensors:
        header = torch.zeros(_HEADER, dtype=torch.int64)
        header[:2 + t.dim()] = torch.tensor([t.dim(), _DTYPES.index(t.dtype), *t.shape])
        dist.send(header.to(t.device), dst=dst, group=group)
        dist.send(t.contiguous(), dst=dst, group=group)


def _recv(src: int, group, device: torch.device) -> list[torch.Tensor]:
    received = []
    for _ in range(_HANDED_ON):
        header = torch.empty(_HEADER, dtype=torch.int64, device=device)
        dist.recv(header, src=src, group=group)
        ndim, code, *sizes = header.tolist()
        tensor = torch.empty(sizes[:ndim], dtype=_DTYPES[code], device=device)
        dist.recv(tensor, src=src, group=group)
        received.append(tensor)
    return received


def forward_in_stage_order(stages: dict[int, nn.Module], owners: list[int], pp_rank: int, group,
                           micro_batches: list[tuple], loss_fn: Callable, device: torch.device) -> list[torch.Tensor]:
    """stages: this rank's {stage index: module}; owners[i]: the PP rank holding stage i;
    micro_batches: (first stage's inputs or None, labels or None) per micro-batch. Returns the
    last stage's losses, one per micro-batch, on the rank that holds it ([] elsewhere)."""
    last = len(owners) - 1
    losses = []
    for inputs, labels in micro_batches:
        carried = inputs
        for index in (i for i in range(len(owners)) if owners[i] == pp_rank):
            if index > 0 and owners[index - 1] != pp_rank:
                carried = _recv(dist.get_global_rank(group, owners[index - 1]), group, device)
            output = stages[index](*carried)
            if index == last:
                losses.append(loss_fn(output, labels))
            elif owners[index + 1] != pp_rank:
                _send(output, dist.get_global_rank(group, owners[index + 1]), group)
            else:
                carried = output
    return losses
