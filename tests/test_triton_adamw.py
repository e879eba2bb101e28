"""TritonAdamW (--optimizer-impl triton) against torch.optim.AdamW: the same parameters and moments
after several steps (weight decay on and off, a changing learning rate, clipping through
grad_scale), interchangeable state_dicts, and the same training run. On CPU the kernel runs under
Triton's interpreter (tests/conftest.py); tests/test_kernels_cuda.py repeats it on a GPU."""
import copy
import importlib.util

import pytest
import torch

from kernels.dispatch import triton_interpreter_enabled
from megatron_code.errors import ConfigError
from megatron_code.parallel.grads import clip_grads_by_norm, global_grad_norm
from megatron_code.parallel.state import ParallelState
from megatron_code.training.arguments import run_config_from_values
from megatron_code.training.config import OptimizerConfig
from megatron_code.training.optimizer import TritonAdamW, adamw, resolve_optimizer_impl
from megatron_code.training.validate import validate_run
from tests.conftest import run_training, tiny_run

INTERPRETER = triton_interpreter_enabled() and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
runs_triton = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETER,
                                 reason="needs CUDA, or triton with TRITON_INTERPRET=1")
SHAPES = [(37, 5), (4097,), (3,), (2, 3, 700)]  # one more than a 4096 block; tiny; 3-D


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(DEVICE)) for shape in SHAPES]


def groups(params):
    """Matrices decayed, vectors not (parameter_groups' rule)."""
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0}]


def run_steps(optimizer_cls, clip: float, steps: int = 4) -> tuple[list, dict]:
    params = make_params()
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    optimizer = optimizer_cls(groups(params), **hyper)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = (3 * torch.randn(p.shape, generator=gen)).to(DEVICE)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 * (step + 1) / steps  # a warmup: lr is read every step
        clip_grads_by_norm(params, clip, global_grad_norm(params, ParallelState()), optimizer)
        optimizer.step()
    return params, optimizer


def torch_adamw(param_groups, **hyper):
    return torch.optim.AdamW(param_groups, **hyper, foreach=False)


@runs_triton
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_triton_adamw_matches_torch_adamw(clip):
    """clip 1.0 is below every step's gradient norm: the kernel divides by grad_scale."""
    ours, ours_opt = run_steps(TritonAdamW, clip)
    theirs, theirs_opt = run_steps(torch_adamw, clip)
    assert (ours_opt.grad_scale is not None) == (clip > 0)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours_opt.state[a][key], theirs_opt.state[b][key], rtol=1e-6, atol=1e-7)
        assert ours_opt.state[a]["step"].item() == theirs_opt.state[b]["step"].item() == 4


@runs_triton
def test_state_dicts_move_between_triton_and_torch_adamw():
    """A checkpoint written under one implementation resumes under the other."""
    ours, ours_opt = run_steps(TritonAdamW, 0.0, steps=2)
    theirs = make_params()
    for a, b in zip(theirs, ours):
        a.data.copy_(b.data)
    theirs_opt = torch_adamw(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    # deep copies: torch's load_state_dict keeps the CPU "step" tensors it is given (shared otherwise)
    theirs_opt.load_state_dict(copy.deepcopy(ours_opt.state_dict()))
    back = TritonAdamW(groups(make_params()), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    back.load_state_dict(copy.deepcopy(theirs_opt.state_dict()))
    assert back.state_dict()["state"][0]["step"].item() == 2
    for p_ours, p_theirs in zip(ours, theirs):
        grad = torch.ones_like(p_ours)
        p_ours.grad, p_theirs.grad = grad.clone(), grad.clone()
    ours_opt.step()
    theirs_opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_optimizer_impl_resolution_and_errors():
    assert resolve_optimizer_impl("auto", on_cuda=False) == "torch"
    assert type(adamw([{"params": make_params()}], OptimizerConfig(optimizer_impl="torch"), False)) is torch.optim.AdamW
    cfg = run_config_from_values({**tiny_run("unused"), "mock_data": True, "data_path": [], "optimizer_impl": "apex"})
    with pytest.raises(ConfigError, match=r"--optimizer-impl.*one of \('auto', 'torch', 'triton'\).*'apex'"):
        validate_run(cfg, require_files=False)


@runs_triton
def test_training_with_triton_adamw_follows_torch_adamw(fixture_data):
    """The trainer end to end (clipping in the step, the LR schedule, fp32 master weights): the
    same loss curve with either implementation."""
    on_cuda = DEVICE == "cuda"
    assert type(adamw([{"params": make_params()}], OptimizerConfig(optimizer_impl="triton"), on_cuda)) is TritonAdamW
    triton_run = run_training(tiny_run(fixture_data, train_iters=4, optimizer_impl="triton"))
    torch_run = run_training(tiny_run(fixture_data, train_iters=4, optimizer_impl="torch"))
    assert [r["step"] for r in triton_run] == [1, 2, 3, 4]
    for a, b in zip(triton_run, torch_run, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
