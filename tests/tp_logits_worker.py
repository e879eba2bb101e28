"""torchrun worker for tests/test_convert.py: load one of our checkpoints under tensor parallelism
and write the full-vocabulary logits of given tokens (gathered from the TP ranks) to a file.

    torchrun --nproc-per-node 2 tests/tp_logits_worker.py CKPT TOKENS.pt OUT.pt
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoints_convert.ours import OurCheckpoint  # noqa: E402
from megatron_code.distributed import init_distributed  # noqa: E402
from megatron_code.model import GPTModel  # noqa: E402
from megatron_code.parallel.state import ParallelConfig, build_parallel_state  # noqa: E402
from megatron_code.training.checkpointing import load_checkpoint  # noqa: E402


def main(ckpt: str, tokens_file: str, out_file: str) -> None:
    env = init_distributed()
    parallel = build_parallel_state(ParallelConfig(tensor_model_parallel_size=dist.get_world_size()), env.device)
    config = OurCheckpoint(ckpt).config
    model = GPTModel(config, parallel)
    load_checkpoint(ckpt, model, None, parallel, restore_rng=False)
    with torch.no_grad():
        local = model(torch.load(tokens_file)).contiguous()  # [b, s, V / tp]
    pieces = [torch.empty_like(local) for _ in range(parallel.tp)]
    dist.all_gather(pieces, local, group=parallel.tp_group)
    if env.rank == 0:
        torch.save(torch.cat(pieces, dim=-1)[..., :config.vocab_size], out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
