"""Learning-rate schedules against their closed forms, and AdamW parameter groups."""
import math

import pytest
import torch

from megatron_code.model import GPTModel, ModelConfig
from megatron_code.training.config import OptimizerConfig, SchedulerConfig
from megatron_code.training.lr_schedule import LearningRateSchedule
from megatron_code.parallel.grads import clip_grads_by_norm, global_grad_norm
from megatron_code.parallel.state import ParallelState
from megatron_code.training.optimizer import parameter_groups


def schedule(style, warmup=10, decay=110, **extra):
    return LearningRateSchedule(
        SchedulerConfig(lr_warmup_iters=warmup, lr_decay_iters=decay, lr_decay_style=style, **extra),
        OptimizerConfig(lr=1.0, min_lr=0.1), train_iters=decay,
    )


def test_warmup_is_linear_from_zero():
    lr = schedule("cosine")
    assert [lr(s) for s in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])


@pytest.mark.parametrize("style, midpoint", [("cosine", 0.55), ("linear", 0.55), ("constant", 1.0)])
def test_decay_styles_mid_and_end(style, midpoint):
    lr = schedule(style)
    assert lr(60) == pytest.approx(midpoint)  # halfway through decay (10..110)
    assert lr(110) == pytest.approx(1.0 if style == "constant" else 0.1)
    assert lr(500) == pytest.approx(1.0 if style == "constant" else 0.1)


def test_cosine_closed_form():
    lr = schedule("cosine")
    for step in (20, 47, 93):
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert lr(step) == pytest.approx(expected)


def test_wsd_holds_then_decays():
    lr = schedule("WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style="linear")
    assert lr(50) == lr(90) == 1.0
    assert lr(100) == pytest.approx(0.55)
    assert lr(110) == pytest.approx(0.1)


def test_inverse_square_root():
    lr = schedule("inverse-square-root", warmup=4)
    assert lr(16) == pytest.approx(0.5) and lr(10_000) == pytest.approx(0.1)


def test_no_weight_decay_on_norms():
    model = GPTModel(ModelConfig(num_layers=2, vocab_size=100, group_query_attention=True, num_query_groups=2))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("layernorm" in names[id(p)] for p in no_decay["params"])
    assert len(no_decay["params"]) == 2 * 2 + 1 and no_decay["weight_decay"] == 0.0
    assert any("word_embeddings" in names[id(p)] for p in decay["params"])


def test_clip_gradients_scales_to_max_norm():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad, params[1].grad = torch.full((3,), 2.0), torch.full((4,), 2.0)
    norm = global_grad_norm(params, ParallelState())
    clip_grads_by_norm(params, 1.0, norm)
    assert norm.item() == pytest.approx(math.sqrt(7 * 4))
    clipped = torch.cat([p.grad for p in params]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("max_norm", [1.0, 100.0])
def test_clipping_inside_fused_adamw_equals_clipping_before_it(max_norm):
    """A fused AdamW (what CUDA runs get; CPU has one too) clips inside its step through
    `grad_scale`; the parameters after the step equal an explicit clip then a plain step."""
    def step(fold: bool):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 3
        optimizer = torch.optim.AdamW(params, lr=0.1, fused=fold or None)
        norm = global_grad_norm(params, ParallelState())
        clip_grads_by_norm(params, max_norm, norm, optimizer)
        assert (getattr(optimizer, "grad_scale", None) is not None) == fold
        optimizer.step()
        return torch.cat([p.detach().flatten() for p in params])

    torch.testing.assert_close(step(fold=True), step(fold=False), rtol=1e-6, atol=1e-6)
