"""TritonAdamW (--optimizer-impl triton) against torch.optim.AdamW: the same parameters and moments
after several steps (weight decay on and off, a changing learning rate, clipping through
grad_scale), interchangeable state_dicts, and the same training run. On CPU the kernel runs under
Triton's interpreter (tests/conftest.py); tests/test_kernels_cuda.py repeats it on a GPU."""
import copy
import importlib.util

import pytest
import torch

from kernels.dispatch import triton_interpreter_enabled, triton_module
from megatron_code.model.config import ModelConfig
from megatron_code.model.gpt import GPTModel
from megatron_code.errors import ConfigError
from megatron_code.parallel.fused_wgrad import cached_weight_casts
from megatron_code.parallel.grads import clip_grads_by_norm, global_grad_norm
from megatron_code.parallel.state import ParallelState
from megatron_code.training.arguments import run_config_from_values
from megatron_code.training.config import OptimizerConfig
from megatron_code.training.optimizer import TritonAdamW, adamw, build_optimizer, resolve_optimizer_impl
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


class PerParameterTritonAdamW(TritonAdamW):
    launch_per_parameter = True


@runs_triton
def test_one_launch_per_parameter_steps_exactly_as_one_per_group():
    """The multi-tensor launch and one launch per parameter (bench_optimizer's A/B) are the same
    arithmetic element by element."""
    ours, _ = run_steps(TritonAdamW, 1.0, steps=2)
    apart, _ = run_steps(PerParameterTritonAdamW, 1.0, steps=2)
    for a, b in zip(ours, apart, strict=True):
        assert torch.equal(a, b)


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


@runs_triton
def test_parameters_with_different_step_counts_step_apart():
    """A parameter without a gradient skips a step (torch's rule), so its bias corrections fall
    behind the others': the launch per step count keeps each one's."""
    params, theirs = make_params(), make_params()
    ours_opt = TritonAdamW(groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    theirs_opt = torch_adamw(groups(theirs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        for a, b in zip(params, theirs):
            grad = torch.randn(a.shape, generator=gen).to(DEVICE)
            a.grad, b.grad = (None, None) if step == 1 and a.ndim > 1 else (grad, grad.clone())
        ours_opt.step()
        theirs_opt.step()
    assert sorted(int(s["step"]) for s in ours_opt.state.values()) == [2, 2, 3, 3]
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@runs_triton
def test_the_step_writes_the_updated_weights_copy_and_checks_its_operands():
    """The copy holds the updated parameter in bf16: torch's cast of it on CUDA, bit for bit;
    within a bf16 step under the interpreter, whose stores truncate instead of rounding."""
    kernels = triton_module("triton_adamw")
    param, grad = torch.randn(3, 5000, device=DEVICE), torch.randn(3, 5000, device=DEVICE)
    moments = torch.zeros_like(param), torch.zeros_like(param)
    copy = torch.empty_like(param, dtype=torch.bfloat16)
    kernels.adamw_step_([kernels.AdamWTensors(param, grad, *moments, copy)], lr=1e-2, beta1=0.9, beta2=0.95,
                        eps=1e-8, weight_decay=0.1, step=1)
    if DEVICE == "cuda":
        assert torch.equal(copy, param.to(torch.bfloat16))
    else:
        torch.testing.assert_close(copy.float(), param, rtol=2 ** -7, atol=0)
    with pytest.raises(ValueError, match=r"operand grad: expected a contiguous \(3, 5000\) tensor.*got \(5000, 3\)"):
        kernels.adamw_step_([kernels.AdamWTensors(param, grad.t(), *moments)], lr=1e-2, beta1=0.9, beta2=0.95,
                            eps=1e-8, weight_decay=0.0, step=2)


@runs_triton
def test_one_call_steps_tensors_of_different_dtypes():
    """bf16-stored parameters, gradients and moments beside fp32 ones in one call (a launch per
    dtype combination): the math in fp32, each result stored in its tensor's dtype."""
    kernels = triton_module("triton_adamw")
    gen = torch.Generator().manual_seed(4)
    fp32 = [torch.randn(n, generator=gen).to(DEVICE) for n in (4097, 10)]
    low = [x.to(torch.bfloat16) for x in fp32]
    before = [x.clone() for x in fp32 + low]
    grads = [torch.randn(x.shape, generator=gen).to(DEVICE) for x in fp32]
    operands = [kernels.AdamWTensors(p, g.to(p.dtype), torch.zeros_like(p), torch.zeros_like(p))
                for p, g in zip(fp32 + low, grads + grads)]
    want = [p.float().clone().requires_grad_() for p in low]
    reference = torch.optim.AdamW(want, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for w, g in zip(want, grads):
        w.grad = g.to(torch.bfloat16).float()
    reference.step()
    kernels.adamw_step_(operands, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
    for p, w in zip(low, want):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), w.detach(), rtol=2 ** -7, atol=1e-6)
    assert not any(torch.equal(x, old) for x, old in zip(fp32 + low, before))  # every tensor stepped


@runs_triton
def test_the_kernel_is_told_alignment_only_where_every_operand_has_it():
    """ALIGNED (vectorizing hints) needs every address 16-byte aligned and every count a multiple
    of 16; a view one element into a flat buffer (a ZeRO-1 shard, say) turns it off, and the step
    is the same either way."""
    kernels = triton_module("triton_adamw")
    flat, grads = torch.randn(4097, device=DEVICE), torch.randn(4097, device=DEVICE)
    for offset in (0, 1):
        param = flat.clone()[offset:offset + 4096]  # a view 4 bytes into its buffer at offset 1
        grad = grads[offset:offset + 4096]
        moments = torch.zeros(4096, device=DEVICE), torch.zeros(4096, device=DEVICE)
        operands = [kernels.AdamWTensors(param, grad, *moments)]
        assert kernels.address_table(operands)[1] == (offset == 0)
        kernels.adamw_step_(operands, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1)
        # the first AdamW step: decay, then lr times the gradient's sign (m / sqrt(v) after bias correction)
        want = flat[offset:offset + 4096] * (1 - 1e-3) - 1e-2 * torch.sign(grad)
        torch.testing.assert_close(param, want, rtol=1e-5, atol=1e-6)


def bf16_steps(copies: bool, steps: int = 3) -> tuple[list[float], list[int]]:
    """A tiny model's bf16 training steps (gradient-accumulation fusion, two micro-batches) under
    build_optimizer's TritonAdamW; with or without the optimizer writing the weight copies.
    Returns the losses and, per step, how many of the step's weight copies were prepared ones."""
    model = GPTModel(ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                 num_query_groups=2, group_query_attention=True, vocab_size=256,
                                 max_position_embeddings=32, cross_entropy_impl="reference",
                                 untie_embeddings_and_output_weights=True), init_seed=3).to(DEVICE)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.1, optimizer_impl="triton"))
    assert optimizer.copies_for is model
    if not copies:
        optimizer.write_weight_copies_for(None)
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses, reused = [], []
    for _ in range(steps):
        prepared = {id(copy) for _, copy, _ in model.weight_casts.prepared.values()}
        with cached_weight_casts(model):
            for micro_batch in tokens.split(1):
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    loss = model(micro_batch[:, :-1], labels=micro_batch[:, 1:]).mean()
                loss.backward()
                losses.append(loss.item())
            reused.append(sum(id(copy) in prepared for _, copy in model.weight_casts.copies.values()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, reused


@runs_triton
def test_training_on_the_optimizers_weight_copies_matches_casting_them():
    """From the second step on, every linear and the loss head read the copies the optimizer wrote
    (8 linears + the output weight) and the losses are those of casting each step: equal on CUDA;
    under the interpreter the truncating bf16 store moves them by a bf16 rounding at most."""
    losses, reused = bf16_steps(copies=True)
    reference, none_reused = bf16_steps(copies=False)
    assert reused == [0, 9, 9] and none_reused == [0, 0, 0]
    if DEVICE == "cuda":
        assert losses == reference
    else:
        assert losses == pytest.approx(reference, rel=1e-2)
        assert losses[:2] == reference[:2]  # the first step casts in both runs


def test_optimizer_impl_resolution_and_errors():
    assert resolve_optimizer_impl("auto", on_cuda=False) == "torch"
    assert type(adamw([{"params": make_params()}], OptimizerConfig(optimizer_impl="torch"), False)) is torch.optim.AdamW
    cfg = run_config_from_values({**tiny_run("unused"), "mock_data": True, "data_path": [], "optimizer_impl": "apex"})
    with pytest.raises(ConfigError, match=r"--optimizer-impl.*one of \('auto', 'torch', 'triton'\).*'apex'"):
        validate_run(cfg, require_files=False)


@runs_triton
@pytest.mark.parametrize("bf16", [False, True])
def test_training_with_triton_adamw_follows_torch_adamw(fixture_data, bf16):
    """The trainer end to end (clipping in the step, the LR schedule, fp32 master weights; under
    bf16 the optimizer also writes the weight copies): the same loss curve with either
    implementation (bf16 under the interpreter: within its truncating stores' rounding)."""
    on_cuda = DEVICE == "cuda"
    assert type(adamw([{"params": make_params()}], OptimizerConfig(optimizer_impl="triton"), on_cuda)) is TritonAdamW
    common = dict(train_iters=4, bf16=bf16)
    triton_run = run_training(tiny_run(fixture_data, **common, optimizer_impl="triton"))
    torch_run = run_training(tiny_run(fixture_data, **common, optimizer_impl="torch"))
    assert [r["step"] for r in triton_run] == [1, 2, 3, 4]
    loose = bf16 and not on_cuda
    for a, b in zip(triton_run, torch_run, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=5e-4 if loose else 1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-3 if loose else 1e-4)
