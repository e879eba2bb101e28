"""Spawned worker for tests/test_kernels.py: the fused linear cross-entropy with the vocabulary
split over gloo ranks (vocab-parallel TP) equals the unfused single-process loss on the whole
weight, losses and gradients, for each implementation, also as the forward-gradient op; and a GPTModel under TP2 + sequence
parallelism with the fused loss head equals the single-process model with the unfused one.

Kept in a light module: spawned processes import it, not the test module."""
import torch
import torch.distributed as dist

from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_unfused
from kernels.weighted_linear_cross_entropy import weighted_linear_cross_entropy
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


def _sharded(impl: str, rank: int, world: int, weighted: bool):
    """This rank's vocabulary rows through the fused head: per-token losses weighted by the caller,
    or (weighted) the forward-gradient op given the weights."""
    hidden, weight, targets, grad_weights = _inputs()
    rows = PADDED_VOCAB // world
    hidden.requires_grad_()
    shard = weight[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    common = dict(vocab_size=VOCAB, vocab_start=rank * rows, group=dist.group.WORLD, impl=impl, chunk_tokens=16,
                  chunk_vocab=16)
    if weighted:
        total, losses = weighted_linear_cross_entropy(hidden, shard, targets, grad_weights, **common)
        torch.testing.assert_close(total, (losses * grad_weights).sum())
        total.backward()
    else:
        losses = linear_cross_entropy(hidden, shard, targets, **common)
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


def _weighted_model_grads(parallel, weighted: bool) -> tuple[float, dict]:
    """A TP model under bf16 autocast and fusion with the fused head: its loss and gradients from
    loss_weights (the forward-gradient head) or from weighting the per-token losses."""
    from megatron_code.parallel.fused_wgrad import cached_weight_casts

    config = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                         group_query_attention=True, num_query_groups=2, vocab_size=200,
                         make_vocab_size_divisible_by=64, max_position_embeddings=16, cross_entropy_impl="reference")
    model = GPTModel(config, parallel, init_seed=3)
    tokens = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(2))
    weights = torch.linspace(0, 1, 16).view(2, 8) / 16
    with cached_weight_casts(model), torch.autocast("cpu", dtype=torch.bfloat16):
        if weighted:
            loss = model(tokens[:, :-1], labels=tokens[:, 1:], loss_weights=weights)
        else:
            loss = (model(tokens[:, :-1], labels=tokens[:, 1:]) * weights).sum()
        loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _check_weighted_model_under_tp(world: int) -> None:
    """TP2 + SP: the forward-gradient head gives this rank the loss and gradients of the
    recomputing head (which the unfused single-process model checks above)."""
    import megatron_code.model.gpt as gpt

    parallel = build_parallel_state(ParallelConfig(tensor_model_parallel_size=world, sequence_parallel=True),
                                    torch.device("cpu"))
    calls, op = [], gpt.weighted_linear_cross_entropy
    gpt.weighted_linear_cross_entropy = lambda *a, **kw: calls.append(1) or op(*a, **kw)
    try:
        got_loss, got = _weighted_model_grads(parallel, weighted=True)
    finally:
        gpt.weighted_linear_cross_entropy = op
    assert calls == [1]  # the forward-gradient head ran
    want_loss, want = _weighted_model_grads(parallel, weighted=False)
    assert abs(got_loss - want_loss) <= 1e-5 * abs(want_loss)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def tp_worker(rank: int, world: int, port: int, impls: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        expected = _expected()
        for impl in impls:
            for weighted in (False, True):
                for got, want, name in zip(_sharded(impl, rank, world, weighted), expected,
                                           ("loss", "grad hidden", "grad weight")):
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"{impl} weighted={weighted} {name}: {m}")
        _check_model_under_tp(rank, world)
        _check_weighted_model_under_tp(world)
    finally:
        dist.destroy_process_group()
