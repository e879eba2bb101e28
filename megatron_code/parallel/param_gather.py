"""Waiting for a parameter whose all-gather may still be in flight (ZeRO-1 with
--overlap-param-gather, megatron_code/parallel/distributed_optimizer.py).

The distributed optimizer launches each bucket's parameter all-gather after its step and returns;
the next forward waits for a bucket just before the first module that owns one of its parameters
runs (forward pre-hooks). A parameter read outside its owner's forward (the output layer's weight,
read by the loss head) calls `wait_until_gathered` first."""
from __future__ import annotations

import torch


def wait_until_gathered(param: torch.Tensor) -> torch.Tensor:
    """param, once its pending all-gather (if any) has landed."""
    wait = getattr(param, "wait_until_gathered", None)
    if wait is not None:
        wait()
    return param
