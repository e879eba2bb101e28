"""Process-group setup: torchrun's environment when present, else a 1-process gloo group (which
megatron-core's dataset builder and DCP both expect to exist)."""
from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_code.parallel.state import distributed_timeout


@dataclass
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float | None = None) -> DistributedEnv:
    """NCCL when CUDA is available, gloo otherwise; idempotent. timeout_minutes: how long the
    world group's collectives wait (--distributed-timeout-minutes; None: torch's default)."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # What is still referenced when destroy_distributed runs (a profiling run's hooks) is
        # freed once main() has returned, before finalization (see destroy_distributed).
        atexit.unregister(gc.collect)
        atexit.register(gc.collect)
        backend = "nccl" if use_cuda else "gloo"
        timeout = distributed_timeout(timeout_minutes)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, device_id=device if use_cuda else None, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def destroy_distributed() -> None:
    """Destroy every process group and free their C++ objects now.

    destroy_process_group only unregisters the groups: each one's C++ object, and with gloo its
    transport and worker threads, lives until its last Python reference goes. The trainer holds
    them in reference cycles, which refcounting never frees: without a collection a PP2 worker
    still ran 12 gloo threads at interpreter finalization, when a thread that takes the GIL is
    ended by force. That is the likely cause of a rare abort after a finished run ("terminate
    called without an active exception"). Callers drop their references to the trainer first. A
    collection cannot free a cycle that passes through C++ (a parameter's gradient hook): such
    references must be weak where they are made (parallel/grads.py BucketTrigger._watch); see
    docs/training.md, "End of a run"."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
