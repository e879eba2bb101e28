"""Data-parallel gradient buckets launch during backward once armed: after the last micro-batch
(arm(1)), or after all micro-batches of a pipeline schedule (arm(M)); finish() completes the rest."""
import socket

import pytest
import torch
import torch.distributed as dist

from megatron_code.parallel.grads import GradientReducer


@pytest.fixture
def one_rank_group():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _model_and_reducer(group):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    reducer = GradientReducer(list(model.parameters()), group, bucket_elements=1)  # one bucket per parameter
    return model, reducer


def _micro_batch(model, seed):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
    model(x).sum().backward()


def test_buckets_launch_only_after_the_armed_number_of_accumulations(one_rank_group):
    model, reducer = _model_and_reducer(one_rank_group)
    reducer.arm(3)
    for seed in range(2):
        _micro_batch(model, seed)
        assert all(bucket.work is None for bucket in reducer.buckets)
    _micro_batch(model, 2)
    assert all(bucket.work is not None for bucket in reducer.buckets)  # launched inside backward
    reducer.finish()
    assert not reducer.armed


def test_unarmed_micro_batches_accumulate_locally_and_finish_gives_the_sum(one_rank_group):
    model, reducer = _model_and_reducer(one_rank_group)
    expected = torch.nn.Sequential(*[torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)])
    expected.load_state_dict(model.state_dict())
    for seed in range(3):
        if seed == 2:
            reducer.arm(1)
        _micro_batch(model, seed)
        _micro_batch(expected, seed)
    reducer.finish()
    for ours, reference in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad)  # one rank: the sum is the local sum


def test_gradients_accumulate_in_the_buckets_buffers_and_zero_grad_keeps_them_there(one_rank_group):
    model, reducer = _model_and_reducer(one_rank_group)
    buffers = {b.buffer.data_ptr() for b in reducer.buckets}
    for step in range(2):
        reducer.zero_grad()
        reducer.arm(1)
        _micro_batch(model, step)
        reducer.finish()
        for bucket in reducer.buckets:
            for p, view in zip(bucket.params, bucket.views):
                assert p.grad.data_ptr() == view.data_ptr() and p.grad.abs().sum() > 0
                assert (view.data_ptr() - bucket.buffer.data_ptr()) % 256 == 0  # aligned as an allocation
    assert {b.buffer.data_ptr() for b in reducer.buckets} == buffers  # no copy, no new buffer


def test_a_gradient_moved_out_of_its_buffer_is_refused_before_the_all_reduce(one_rank_group):
    model, reducer = _model_and_reducer(one_rank_group)
    for p in model.parameters():
        p.grad = None  # what optimizer.zero_grad(set_to_none=True) would do
    reducer.arm(1)
    with pytest.raises(RuntimeError, match=r"GradientReducer\.zero_grad\(\)"):
        _micro_batch(model, 0)


def test_the_distributed_optimizer_refuses_a_gradient_moved_out_of_its_buffer_too(one_rank_group):
    from megatron_code.parallel.distributed_optimizer import DistributedOptimizer
    from megatron_code.parallel.state import ParallelConfig, build_parallel_state
    from megatron_code.training.config import OptimizerConfig

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    parallel = build_parallel_state(ParallelConfig(), torch.device("cpu"))
    optimizer = DistributedOptimizer(model, OptimizerConfig(), parallel, one_rank_group)
    optimizer.zero_grad()
    optimizer.arm(1)
    _micro_batch(model, 0)  # the views take the gradients: launched and finished without complaint
    optimizer.finish()
    model[0].weight.grad = None
    optimizer.arm(1)
    with pytest.raises(RuntimeError, match=r"DistributedOptimizer\.zero_grad\(\)"):
        _micro_batch(model, 1)


def test_the_planner_models_the_buckets_the_reducer_makes(one_rank_group):
    """plan/timing.first_stage_buckets (the edge bucket and the count of ring passes the planner
    charges) against the buckets GradientReducer builds over a real model's parameters."""
    from megatron_code.model import GPTModel
    from megatron_code.model.config import ModelConfig
    from megatron_code.parallel.state import ParallelConfig, build_parallel_state
    from megatron_code.plan.layout import Layout
    from megatron_code.plan.timing import first_stage_buckets

    toy = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                      group_query_attention=True, num_query_groups=1, max_position_embeddings=64,
                      vocab_size=32, make_vocab_size_divisible_by=32, untie_embeddings_and_output_weights=True)
    model = GPTModel(toy, build_parallel_state(ParallelConfig(), torch.device("cpu")))
    reducer = GradientReducer(list(model.parameters()), one_rank_group, bucket_elements=300)
    made = [sum(p.numel() for p in bucket.params) for bucket in reducer.buckets]
    assert made == first_stage_buckets(toy, Layout(1, 1, 1, 1, 1, 1, False), 32, 300) == [392, 328, 520, 464]


def test_default_buckets_grow_with_the_group_as_megatron_lms():
    from megatron_code.parallel.grads import default_bucket_elements
    assert [default_bucket_elements(g) for g in (1, 8, 40, 256)] == [40_000_000, 40_000_000, 40_000_000, 256_000_000]
