"""--distributed-timeout-minutes reaches the world group and every group of the device mesh: gloo
here, NCCL (its own options class) where CUDA is present (benchmarks/gpu_check.py runs this file)."""
import datetime

import pytest
import torch
import torch.distributed as dist

from megatron_code.distributed import destroy_distributed, init_distributed
from megatron_code.errors import ConfigError
from megatron_code.parallel.state import MESH_DIM_NAMES, ParallelConfig, build_parallel_state, distributed_timeout
from megatron_code.training.arguments import parse_args


def _timeout(group, device: torch.device) -> datetime.timedelta:
    return group._get_backend(device).options._timeout


def test_the_flag_sets_the_timeout_of_the_world_and_of_every_parallel_group():
    assert not dist.is_initialized()
    env = init_distributed(timeout_minutes=37)
    try:
        want = datetime.timedelta(minutes=37)
        assert _timeout(dist.distributed_c10d._get_default_group(), env.device) == want
        parallel = build_parallel_state(ParallelConfig(distributed_timeout_minutes=37), env.device, fp8_amax_group=True)
        groups = [parallel.group(dim) for dim in MESH_DIM_NAMES] + [parallel.amax_group]
        assert [_timeout(g, env.device) for g in groups] == [want] * len(groups)
    finally:
        destroy_distributed()


def test_without_the_flag_torch_keeps_its_defaults():
    env = init_distributed()
    try:
        parallel = build_parallel_state(ParallelConfig(), env.device)
        default = datetime.timedelta(minutes=10 if env.device.type == "cuda" else 30)  # NCCL's, gloo's
        assert _timeout(parallel.group("dp"), env.device) == default
    finally:
        destroy_distributed()


def test_the_flag_parses_and_a_timeout_that_is_not_positive_is_refused():
    assert parse_args(["--preset", "tiny", "--distributed-timeout-minutes", "45"]).parallel.distributed_timeout_minutes == 45
    with pytest.raises(ConfigError, match=r"--distributed-timeout-minutes must be > 0, got 0"):
        distributed_timeout(0)
