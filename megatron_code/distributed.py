"""Process-group setup: torchrun's environment when present, else a 1-process gloo group (which
megatron-core's dataset builder and DCP both expect to exist)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistributedEnv:
    """NCCL when CUDA is available, gloo otherwise; idempotent."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
