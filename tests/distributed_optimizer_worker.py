"""Worker of tests/test_parallel.py::test_distributed_optimizer_shards_match_adamw, in its own
module so that spawned processes import only what they need (not the test module's fixtures)."""
import os

import torch
import torch.distributed as dist

from megatron_code.parallel.distributed_optimizer import DistributedOptimizer
from megatron_code.parallel.state import ParallelState
from megatron_code.training.config import OptimizerConfig
from megatron_code.training.optimizer import build_optimizer, set_learning_rate


def _model() -> torch.nn.Module:
    # Backward order buckets of >= 10 elements: [15] (padded to 16), [5 + 5], [5 + 35]; 1-D
    # (no decay) and 2-D (decay) parameters share buckets and shards.
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3, bias=False))


def zero1_worker(rank: int, world: int, port: int, overlap: bool = False) -> None:
    """Distributed optimizer on `world` gloo ranks (each half of the batch) vs torch AdamW on the
    whole batch in every rank, with buckets so small that shards cut parameters in the middle.
    overlap: the parameter all-gathers stay in flight after step() until the next forward (or
    wait_for_params) reaches their bucket."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, ref = _model(), _model()
    ref.load_state_dict(model.state_dict())
    cfg = OptimizerConfig(lr=0.05, weight_decay=0.1)
    # shard_alignment 1: shards of a few elements (the default pads each to 64 for aligned loads)
    opt = DistributedOptimizer(model, cfg, ParallelState(dp=world), dist.group.WORLD, bucket_elements=10,
                               overlap_param_gather=overlap, shard_alignment=1)
    aligned = DistributedOptimizer(_model(), cfg, ParallelState(dp=world), dist.group.WORLD, bucket_elements=10)
    assert all(b.shard_size % 64 == 0 and b.grad_buffer.numel() == world * b.shard_size for b in aligned.buckets)
    ref_opt = build_optimizer(ref, cfg)
    assert len(opt.buckets) == 3
    assert any(b.grad_buffer.numel() > sum(p.numel() for p in b.params) for b in opt.buckets)  # padding
    data = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(8, 7, generator=data)
        lr = 0.05 * (step + 1)
        opt.zero_grad()
        opt.arm(1)
        model(x[rank::world]).pow(2).sum().backward()  # the group's gradients are summed
        opt.finish()
        norm = opt.clip_grad_norm(0.5)
        set_learning_rate(opt, lr)
        opt.step()
        assert all((b.gather is not None) == overlap for b in opt.buckets)
        if overlap and step == 2:
            opt.wait_for_params()  # what saving a checkpoint or the end of training does
        elif overlap:
            model(x[:1])  # a forward: each module waited for its buckets before running
        assert all(b.gather is None for b in opt.buckets)
        ref_opt.zero_grad()
        ref(x).pow(2).sum().backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        set_learning_rate(ref_opt, lr)
        ref_opt.step()
        assert float(ref_norm) > 0.5  # clipping is active
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    full = opt.full_adam_state(gather=True)
    for p, q in zip(model.parameters(), ref.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(full[p][key], ref_opt.state[q][key], rtol=1e-5, atol=1e-9)
    assert float(opt.step_count()) == 3.0
    padded = sum(b.grad_buffer.numel() for b in opt.buckets)
    assert opt.memory_bytes()["optimizer"] == 8 * padded // world
    dist.destroy_process_group()
    os._exit(0)  # see ARCHITECTURE.md on gloo exits


def zero1_master_worker(rank: int, world: int, port: int) -> None:
    """bf16 parameters: the distributed optimizer keeps fp32 master shards. Reference: fp32 AdamW
    on master weights whose bf16 rounding computes each rank's half-batch gradient in bf16, the
    halves summed in fp32 (what the ranks' hooks and reduce-scatter do)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, shadow, master = _model().to(torch.bfloat16), _model().to(torch.bfloat16), _model()
    master.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    cfg = OptimizerConfig(lr=0.05, weight_decay=0.1)
    opt = DistributedOptimizer(model, cfg, ParallelState(dp=world), dist.group.WORLD, bucket_elements=10,
                               shard_alignment=1)
    assert opt.master_weights and all(p.dtype == torch.bfloat16 and p.grad is None for p in model.parameters())
    ref_opt = build_optimizer(master, cfg)
    data = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(8, 7, generator=data).bfloat16()
        opt.zero_grad()
        for micro in range(2):  # two micro-batches: only the last is armed
            if micro == 1:
                opt.arm(1)
            model(x[rank::world][micro::2]).float().pow(2).sum().backward()
        opt.finish()
        assert all(p.grad is None for p in model.parameters())  # folded into main_grad by the hooks
        norm = opt.clip_grad_norm(0.5)
        opt.step()
        shadow.load_state_dict({k: v.bfloat16() for k, v in master.state_dict().items()})
        grads = [torch.zeros_like(p) for p in master.parameters()]
        for r in range(world):
            for micro in range(2):
                shadow.zero_grad()
                shadow(x[r::world][micro::2]).float().pow(2).sum().backward()
                for g, p in zip(grads, shadow.parameters()):
                    g += p.grad.float()
        for p, g in zip(master.parameters(), grads):
            p.grad = g
        ref_norm = torch.nn.utils.clip_grad_norm_(master.parameters(), 0.5)
        ref_opt.step()
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        masters = opt.full_master_weights(gather=True)
        for p, q in zip(model.parameters(), master.parameters()):
            torch.testing.assert_close(masters[p], q.detach(), rtol=1e-5, atol=1e-7)
            assert torch.equal(p, q.detach().bfloat16())  # every rank's parameters: the master, rounded
    padded = sum(b.grad_buffer.numel() for b in opt.buckets)
    # the reduce-scatter's output is this rank's part of the gradient buffer (no shard copy)
    assert all(b.grad_shard.data_ptr() == b.grad_buffer[b.lo:].data_ptr() for b in opt.buckets)
    assert opt.memory_bytes() == {"params": 2 * padded, "grads": 4 * padded, "optimizer": 12 * padded // world}
    dist.destroy_process_group()
    os._exit(0)  # see ARCHITECTURE.md on gloo exits
