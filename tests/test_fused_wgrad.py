"""Gradient-accumulation fusion (megatron_code/parallel/fused_wgrad.py) against autograd's path:
the same weight and input gradients over several micro-batches, the bf16 weight copy made once
per step, the gradient-ready hooks fired once per backward, and whole runs that match."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from kernels.weighted_linear_cross_entropy import weighted_linear_cross_entropy
from megatron_code.model.config import ModelConfig
from megatron_code.model.fp8 import enable_fp8
from megatron_code.model.gpt import GPTModel
from megatron_code.parallel.fused_wgrad import (
    StepWeightCasts, cached_weight_casts, embedding_lookup, fusable, fused_wgrad_linear, wanted_weight_copies,
)
from tests.conftest import run_training, tiny_run

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _microbatch_grads(weight, inputs, fused: bool, casts=None):
    """Forward+backward of each input under bf16 autocast; returns (weight.grad, [x.grad])."""
    weight.grad = None
    x_grads = []
    for x in inputs:
        x = x.clone().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            outs = fused_wgrad_linear(x, weight, casts or StepWeightCasts()) if fused else (
                F.linear(x, weight) if weight.dim() == 2 else tuple(F.linear(x, w) for w in weight.unbind(0)))
        outs = outs if isinstance(outs, tuple) else (outs,)
        sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        x_grads.append(x.grad)
    return weight.grad.clone(), x_grads


def _exact_wgrad(weight, inputs):
    """sum over micro-batches of dY^T x in float64, from the bf16 inputs the GEMMs see (dY of
    output i is the constant i + 1, exact in bf16)."""
    k = 1 if weight.dim() == 2 else weight.shape[0]
    grads = []
    for i in range(k):
        x_sum = sum(x.to(torch.bfloat16).double().reshape(-1, x.shape[-1]).sum(0) for x in inputs)  # [in]
        grads.append((i + 1) * x_sum.expand(weight.shape[-2], -1))  # every row: (i + 1) * sum of x
    return grads[0] if k == 1 else torch.stack(grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(48, 32), (2, 24, 32)], ids=["linear", "gate_up"])
def test_fused_weight_gradient_matches_autograd_over_micro_batches(device, shape):
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(*shape, device=device) * 0.1)
    inputs = [torch.randn(2, 16, 32, device=device) for _ in range(3)]  # 3 micro-batches of [b, s, in]
    fused_w, fused_x = _microbatch_grads(weight, inputs, fused=True)
    plain_w, plain_x = _microbatch_grads(weight, inputs, fused=False)
    assert fused_w.dtype == torch.float32 and fused_w.shape == weight.shape
    exact = _exact_wgrad(weight, inputs)
    assert (plain_w.double() - exact).abs().max() <= 1e-2 * exact.abs().max()  # the reference is right
    if device == "cpu":  # same bf16 products, added in fp32 in the same order
        torch.testing.assert_close(fused_w, plain_w, rtol=0, atol=0)
    else:  # cuBLAS accumulates in fp32 and never rounds the product to bf16: nearer the exact sum
        fused_err, plain_err = (fused_w.double() - exact).abs().max(), (plain_w.double() - exact).abs().max()
        assert fused_err <= plain_err and fused_err <= 1e-4 * exact.abs().max(), (fused_err, plain_err)
    for got, want in zip(fused_x, plain_x):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_fused_path_applies_only_to_fp32_leaf_weights_trained_under_autocast():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8)
    assert not fusable(x, weight)  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusable(x, weight)
        assert not fusable(x, weight.detach())  # no gradient wanted
        assert not fusable(x, weight.view(64).view(8, 8))  # not a leaf: autograd must see the view
        with torch.no_grad():
            assert not fusable(x, weight)


def test_weight_copies_are_made_once_per_step_and_see_the_optimizer_update():
    casts = StepWeightCasts()
    weight = torch.nn.Parameter(torch.ones(4, 4))
    assert casts.cast(weight, torch.bfloat16) is not casts.cast(weight, torch.bfloat16)  # outside a step
    model = torch.nn.Module()
    model.weight_casts = casts
    with cached_weight_casts(model):
        first = casts.cast(weight, torch.bfloat16)
        assert casts.cast(weight, torch.bfloat16) is first
    assert not casts.active and not casts.copies
    with torch.no_grad():
        weight.add_(1.0)  # the optimizer step
    with cached_weight_casts(model):
        assert torch.equal(casts.cast(weight, torch.bfloat16), torch.full((4, 4), 2.0, dtype=torch.bfloat16))


def test_a_prepared_copy_serves_the_next_step_only_while_the_weight_is_unchanged():
    """The optimizer-written copies (TritonAdamW): the next step reads the prepared tensor itself;
    one whose weight was written since (a state dict loaded, an in-place update) is recast; one the
    step does not read is dropped when it ends; `wanted` is what the last step cast."""
    casts = StepWeightCasts()
    model = torch.nn.Module()
    model.weight_casts = casts
    weight, other = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(2))
    with cached_weight_casts(model):
        casts.cast(weight, torch.bfloat16)
    assert wanted_weight_copies(model) == {id(weight): (casts, torch.bfloat16)}
    prepared = torch.full((4, 4), 3.0, dtype=torch.bfloat16)  # stands out from a cast of the ones
    casts.prepare(weight, prepared)
    casts.prepare(other, other.detach().to(torch.bfloat16))
    with cached_weight_casts(model):
        assert casts.cast(weight, torch.bfloat16) is prepared
        assert casts.cast(weight, torch.bfloat16) is prepared
    assert not casts.prepared  # `other`'s copy, unread, went with the step
    casts.prepare(weight, prepared)
    with torch.no_grad():
        weight.mul_(2.0)  # written after the optimizer made the copy
    with cached_weight_casts(model):
        assert torch.equal(casts.cast(weight, torch.bfloat16), torch.full((4, 4), 2.0, dtype=torch.bfloat16))
    casts.prepare(weight, prepared)
    assert not torch.equal(casts.cast(weight, torch.bfloat16), prepared)  # outside a step: always a cast
    with cached_weight_casts(model):
        assert not casts.copies  # a step that casts nothing (the prepared copy goes unread) ...
    assert casts.wanted == {} and not casts.prepared  # ... wants nothing next time


def tiny_model(fusion: bool) -> GPTModel:
    config = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         num_query_groups=2, group_query_attention=True, vocab_size=256,
                         max_position_embeddings=32, gradient_accumulation_fusion=fusion)
    return GPTModel(config, init_seed=3)


def _fused_nodes(loss: torch.Tensor) -> int:
    """How many fused-linear backward nodes the autograd graph of `loss` holds."""
    seen, stack, count = set(), [loss.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == "_FusedWgradLinearBackward"
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


def test_gradient_ready_hooks_fire_once_per_backward_for_every_weight():
    """The data-parallel buckets launch on the post-accumulate-grad hooks. A fused weight's
    backward returns no gradient; autograd must still run its hooks, once per micro-batch and
    after the fused accumulation, as it does for the others."""
    model = tiny_model(fusion=True)
    calls: dict[str, int] = {}
    names = {id(p): n for n, p in model.named_parameters()}

    def hook(param):
        assert param.grad is not None  # the gradient is in place when the bucket would launch
        calls[names[id(param)]] = calls.get(names[id(param)], 0) + 1

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(hook)
    tokens = torch.randint(0, 256, (2, 33))
    with cached_weight_casts(model):
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
            # The model routes its 8 linears (4 per layer) through the fused path, and the second
            # micro-batch reuses the first one's bf16 weight copies.
            assert _fused_nodes(loss) == 8 and len(model.weight_casts.copies) == 8
            loss.backward()
    assert calls == {name: 2 for name in names.values()}
    fused = [n for n in names.values() if n.endswith(("linear_qkv.weight", "linear_proj.weight",
                                                       "linear_fc1.weight", "linear_fc2.weight"))]
    assert len(fused) == 8 and all(model.get_parameter(n).grad.dtype == torch.float32 for n in fused)


def test_model_gradients_with_and_without_fusion_agree():
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    grads = {}
    for fusion in (True, False):
        model = tiny_model(fusion)
        with cached_weight_casts(model):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
                assert _fused_nodes(loss) == (8 if fusion else 0)
                loss.backward()
        grads[fusion] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=2e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head", ["auto", "weighted"])
def test_bf16_parameters_accumulate_into_the_distributed_optimizers_fp32_main_grad(head, device):
    """--params-dtype bfloat16 under ZeRO-1: the fused linears, the embedding and the fused loss
    heads write fp32 gradients into main_grad (autograd hands those parameters none); the bf16
    gradients autograd does make (norms; with CPU's unfused head, the tied embedding's logits GEMM)
    are folded into it by the hook. The sum is the fp32-parameter model's gradient."""
    from megatron_code.parallel.distributed_optimizer import DistributedOptimizer
    from megatron_code.parallel.state import ParallelState
    from megatron_code.training.config import OptimizerConfig

    gen = torch.Generator().manual_seed(1)
    tokens, weights = torch.randint(0, 256, (2, 33), generator=gen), torch.rand(2, 32, generator=gen) / 50
    tokens, weights = tokens.to(device), weights.to(device)
    config = tiny_model(True).config
    if head == "weighted":
        config = config.replace(cross_entropy_impl="reference", untie_embeddings_and_output_weights=True)
    fp32 = GPTModel(config, init_seed=3).to(device)
    model = GPTModel(config.replace(params_dtype="bfloat16"), init_seed=3).to(device)
    with torch.no_grad():  # weights bf16 holds exactly: both models compute with the same GEMM weights
        for p, q in zip(fp32.parameters(), model.parameters()):
            p.copy_(q)
    grad_seen = {}  # what autograd hands each parameter (hooks run in order: before the optimizer's fold)
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda param, name=name: grad_seen.update({name: param.grad}) and None)
    optimizer = DistributedOptimizer(model, OptimizerConfig(), ParallelState(), None)
    for m in (fp32, model):
        with cached_weight_casts(m):
            for _ in range(2):
                with torch.autocast(device, dtype=torch.bfloat16):
                    if head == "weighted":
                        loss = m(tokens[:, :-1], labels=tokens[:, 1:], loss_weights=weights)
                    else:
                        loss = m(tokens[:, :-1], labels=tokens[:, 1:]).mean()
                assert _fused_nodes(loss) == 8
                loss.backward()
    assert optimizer.master_weights and all(p.grad is None for p in model.parameters())
    expected = {n for n, _ in model.named_parameters() if n.endswith(".weight") and "linear" in n}  # 8 linears
    if head == "weighted":
        expected |= {"embedding.word_embeddings.weight", "output_layer.weight"}
    elif device == "cuda":  # 'auto' fuses the (tied) head on CUDA
        expected |= {"embedding.word_embeddings.weight"}
    fused = {n for n, g in grad_seen.items() if g is None}
    assert fused == expected
    assert all(grad_seen[n].dtype == torch.bfloat16 for n in grad_seen if n not in fused)
    for (name, p), q in zip(model.named_parameters(), fp32.parameters()):
        torch.testing.assert_close(p.main_grad, q.grad, rtol=3e-2, atol=2e-3, msg=name)


def test_training_with_the_forward_gradient_loss_head_follows_the_unfused_curve(fixture_data):
    """The trainer's loss weights reach the fused head (GPTModel.weighted_loss), which makes its
    gradients in the forward: the bf16 curve of the unfused logits path, two micro-batches a step."""
    common = dict(train_iters=4, micro_batch_size=4, global_batch_size=8, seq_length=128, bf16=True)
    fused = run_training(tiny_run(fixture_data, **common, cross_entropy_impl="reference"))
    plain = run_training(tiny_run(fixture_data, **common, cross_entropy_impl="unfused"))
    for got, want in zip(fused, plain, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-3)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-2)


def test_bf16_training_with_and_without_fusion_follows_the_same_curve(fixture_data):
    common = dict(train_iters=4, micro_batch_size=2, global_batch_size=8, seq_length=128, bf16=True)
    fused = run_training(tiny_run(fixture_data, **common))
    plain = run_training(tiny_run(fixture_data, **common, gradient_accumulation_fusion=False))
    for got, want in zip(fused, plain):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-3)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-2)


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_weights_are_cast_once_per_step_with_the_same_gradients(recipe):
    """FP8 layers take their weight's FP8 cast from the same per-step cache (Transformer Engine's
    first-micro-batch rule): the weight scale records one amax per step, the gradients do not change
    (tensorwise scales depend only on the unchanged weight)."""
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(2))
    grads, uses = {}, {}
    for cached in (True, False):
        model = tiny_model(fusion=True)
        enable_fp8(model.decoder.layers, model.config.replace(fp8_format="hybrid", fp8_recipe=recipe))
        with cached_weight_casts(model) if cached else nullcontext():
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        qkv = model.decoder.layers["0"].self_attention.linear_qkv.fp8
        uses[cached] = (qkv.weight.uses, qkv.input.uses)
        grads[cached] = {n: p.grad for n, p in model.named_parameters()}
    if recipe == "delayed":
        assert uses[True] == (1, 2) and uses[False] == (2, 2)
    else:
        for name, grad in grads[True].items():
            torch.testing.assert_close(grad, grads[False][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fp8", [{}, dict(fp8_format="hybrid", fp8_recipe="tensorwise", fp8_wgrad_impl="reference")],
                         ids=["bf16", "fp8"])
@pytest.mark.parametrize("recompute", [dict(recompute_granularity="full", recompute_method="uniform",
                                            recompute_num_layers=1),
                                       dict(recompute_granularity="selective")], ids=["full", "selective"])
def test_fused_weight_gradients_under_activation_recompute(recompute, fp8):
    """Recompute reruns the forward (the fused linears included) inside backward: each weight's
    gradient is still accumulated once per micro-batch, equal to the stored-activation run (also
    for FP8 linears, whose weight gradients the fused path adds into .grad itself)."""
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(4))
    grads = []
    for extra in ({}, recompute):
        model = tiny_model(fusion=True)
        model = GPTModel(model.config.replace(**extra), init_seed=3)
        if fp8:
            enable_fp8(model.decoder.layers, model.config.replace(**fp8))
        calls = {}
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda param, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
        with cached_weight_casts(model):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
        assert set(calls.values()) == {2}
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("untie", [True, False])
def test_fused_loss_head_uses_the_step_copy_and_accumulates_the_output_weight_gradient(untie):
    """The fused output GEMM + cross-entropy takes the output weight's per-step bf16 copy and adds
    its fp32 gradient into .grad itself (tied: the embedding adds its own too); the gradients match the
    unfused model's, and the bucket hook of the output weight still fires once per micro-batch."""
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(5))
    grads, calls, returned = {}, {}, {}
    for fusion in (True, False):
        base = tiny_model(fusion).config.replace(cross_entropy_impl="reference", untie_embeddings_and_output_weights=untie)
        model = GPTModel(base, init_seed=3)
        weight = model.output_weight()
        calls[fusion], returned[fusion] = 0, []
        weight.register_post_accumulate_grad_hook(lambda p, f=fusion: calls.__setitem__(f, calls[f] + 1))
        # What autograd hands this weight (the loss head's gradient and, tied, the embedding's, summed)
        weight.register_hook(lambda g, f=fusion: returned[f].append(None if g is None else g.clone()))
        with cached_weight_casts(model):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    model(tokens[:, :-1], labels=tokens[:, 1:]).mean().backward()
                if fusion:  # the 8 layer weights and the output weight, cast once for both micro-batches
                    assert len(model.weight_casts.copies) == 9
        grads[fusion] = {n: p.grad for n, p in model.named_parameters()}
    assert calls == {True: 2, False: 2}
    # Fused, the loss head (and, tied, the embedding) returns no gradient for the weight: each
    # added its own into .grad, so autograd hands the weight nothing.
    assert len(returned[True]) == len(returned[False]) == 2 and all(g is not None for g in returned[False])
    assert returned[True] == [None, None]
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=2e-2, atol=1e-3, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_gradient_accumulates_in_place_over_micro_batches(device):
    """The fused embedding lookup adds each micro-batch's row gradients into .grad itself
    (repeated ids included, and a vocabulary-parallel rank's ids outside its range masked as
    VocabParallelEmbedding does): the same fp32 gradient as autograd's, hooks fired each time."""
    gen = torch.Generator().manual_seed(6)
    table = torch.randn(50, 8, generator=gen).to(device)
    ids = [torch.randint(0, 60, (3, 7), generator=gen).to(device) for _ in range(3)]  # ids >= 50: another rank's
    upstream = [torch.randn(3, 7, 8, generator=gen).to(device) for _ in range(3)]
    grads, hooks = {}, {}
    for fused in (True, False):
        weight = torch.nn.Parameter(table.clone())
        hooks[fused] = 0
        weight.register_post_accumulate_grad_hook(lambda p, f=fused: hooks.__setitem__(f, hooks[f] + 1))
        for micro_ids, grad in zip(ids, upstream):
            outside = micro_ids >= 50
            with torch.autocast(device, dtype=torch.bfloat16):
                rows = embedding_lookup(micro_ids.masked_fill(outside, 0), weight, fused)
            assert rows.dtype == torch.float32
            rows.masked_fill(outside[..., None], 0.0).backward(grad)
        grads[fused] = weight.grad
    assert hooks == {True: 3, False: 3}
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-6, atol=1e-6)
    assert all((i >= 50).any() and (i < 50).any() for i in ids)  # both kinds of ids in every micro-batch
    with torch.autocast(device, dtype=torch.bfloat16):  # autograd's path where fusion does not apply
        frozen = torch.nn.Parameter(table.clone(), requires_grad=False)
        assert embedding_lookup(ids[0].clamp(max=49), frozen, True).grad_fn is None


@pytest.mark.parametrize("untie", [True, False])
def test_weighted_loss_head_makes_its_gradients_in_the_forward(untie, monkeypatch):
    """GPTModel(..., loss_weights=w) under fusion takes the forward-gradient head
    (kernels/weighted_linear_cross_entropy.py): over two micro-batches the same loss and every
    gradient as weighting the per-token losses of the recomputing head, tied or not."""
    import megatron_code.model.gpt as gpt

    calls = []
    monkeypatch.setattr(gpt, "weighted_linear_cross_entropy",
                        lambda *a, **kw: calls.append(1) or weighted_linear_cross_entropy(*a, **kw))
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (2, 33), generator=gen)
    weights = (torch.rand(2, 32, generator=gen) > 0.3).float() / 50  # a loss mask over the batch's tokens
    results = {}
    for weighted in (True, False):
        config = tiny_model(True).config.replace(cross_entropy_impl="reference", untie_embeddings_and_output_weights=untie)
        model, losses = GPTModel(config, init_seed=3), []
        with cached_weight_casts(model):
            for _ in range(2):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    if weighted:
                        loss = model(tokens[:, :-1], labels=tokens[:, 1:], loss_weights=weights)
                    else:
                        loss = (model(tokens[:, :-1], labels=tokens[:, 1:]) * weights).sum()
                loss.backward()
                losses.append(loss.item())
        results[weighted] = losses, {n: p.grad for n, p in model.named_parameters()}
    assert len(calls) == 2  # the weighted runs' micro-batches, and only those
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
