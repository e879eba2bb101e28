"""Spawned worker for tests/test_kernels.py: the fused linear cross-entropy with the vocabulary
split over gloo ranks (vocab-parallel TP) equals the unfused single-process loss on the whole
weight, losses and gradients, for each implementation; and a GPTModel under TP2 + sequence
parallelism with the fused loss head equals the single-process model with the unfused one.

Kept in a light module: spawned processes import it, not the test module."""
import torch
import torch.distributed as dist

from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_unfused
from megatron_code.model import GPTModel, ModelConfig
from megatron_code.parallel.state import ParallelConfig, build_parallel_state

TOKENS, HIDDEN, PADDED_VOCAB, VOCAB = 37, 12, 64, 30  # rank 1's whole shard (ids 32-63) is padding


def _inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=gen, dtype=torch.float32)
    weight = torch.randn(PADDED_VOCAB, HIDDEN, generator=gen, dtype=torch.float32)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=gen)
    grad_weights = torch.rand(TOKENS, generator=gen, dtype=torch.float32)  # the caller's mask / reduction
    return hidden, weight, targets, grad_weights


def _expected():
    hidden, weight, targets, grad_weights = _inputs()
    hidden.requires_grad_()
    weight.requires_grad_()
    losses = linear_cross_entropy_unfused(hidden, weight, targets, VOCAB)
    (losses * grad_weights).sum().backward()
    return losses.detach(), hidden.grad, weight.grad


def _sharded(impl: str, rank: int, world: int):
    hidden, weight, targets, grad_weights = _inputs()
    rows = PADDED_VOCAB // world
    hidden.requires_grad_()
    shard = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    losses = linear_cross_entropy(hidden, shard, targets, vocab_size=VOCAB, vocab_start=rank * rows,
                                  group=dist.group.WORLD, impl=impl, chunk_tokens=16,
                                  chunk_vocab=16)
    (losses * grad_weights).sum().backward()
    grad_hidden = hidden.grad.clone()
    dist.all_reduce(grad_hidden)  # what copy_to_tensor_parallel's backward does in the model
    pieces = [torch.empty_like(shard.grad) for _ in range(world)]
    dist.all_gather(pieces, shard.grad)
    return losses.detach(), grad_hidden, torch.cat(pieces)


def _model_loss_and_embedding_grad(parallel, cross_entropy_impl: str):
    config = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                         group_query_attention=True, num_query_groups=2, vocab_size=200,
                         make_vocab_size_divisible_by=64, max_position_embeddings=16,
                         cross_entropy_impl=cross_entropy_impl)
    model = GPTModel(config, parallel, init_seed=3) if parallel else GPTModel(config, init_seed=3)
    tokens = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(1))
    losses = model(tokens, labels=tokens.roll(-1, dims=1))
    (losses * torch.linspace(0, 1, 8)).sum().backward()
    return losses.detach(), model.embedding.word_embeddings.weight.grad  # tied: also the output layer


def _check_model_under_tp(rank: int, world: int) -> None:
    """TP + SP model with the fused head vs one process unfused: losses and this rank's vocabulary
    rows of the tied embedding/output gradient (it sees the output GEMM's grad_W directly, and
    grad_hidden through every layer, so a missing TP sum of grad_hidden would show)."""
    parallel = build_parallel_state(ParallelConfig(tensor_model_parallel_size=world, sequence_parallel=True),
                                    torch.device("cpu"))
    got_loss, got_grad = _model_loss_and_embedding_grad(parallel, "reference")
    want_loss, want_grad = _model_loss_and_embedding_grad(None, "unfused")
    rows = want_grad.shape[0] // world
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad[rank * rows:(rank + 1) * rows], rtol=1e-4, atol=1e-6)


def tp_worker(rank: int, world: int, port: int, impls: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        expected = _expected()
        for impl in impls:
            for got, want, name in zip(_sharded(impl, rank, world), expected, ("loss", "grad hidden", "grad weight")):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{impl} {name}: {m}")
        _check_model_under_tp(rank, world)
    finally:
        dist.destroy_process_group()
