"""The FP8 SwiGLU MLP (kernels/fp8_mlp.py): the SwiGLU kernels that write their output and input
gradient in FP8 (kernels/triton_fp8_swiglu.py, under Triton's interpreter on CPU), the MLP's
forward and gradients against a float64 computation on the values FP8 holds, and a tiny model with
and without the fusion. tests/test_fp8_cuda.py repeats the kernels against torch's casts on a GPU."""
import importlib.util

import pytest
import torch

from kernels.dispatch import triton_interpreter_enabled
from kernels.fp8_linear import Fp8LinearScaling, Fp8Weight
from kernels.fp8_mlp import fp8_swiglu_mlp
from kernels.fp8_scaling import FP8_DTYPES, FP8_MAX, ScalingConfig, dequantize, quantize, scale_from_amax
from kernels.swiglu import swiglu_halves_grad_values, swiglu_halves_values
from tests.test_fp8 import _train, _tiny

interpreted = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or torch.cuda.is_available() or not triton_interpreter_enabled(),
    reason="needs triton under TRITON_INTERPRET=1 on a machine without CUDA")


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.view(torch.uint8) == b.view(torch.uint8)).float().mean().item()


@interpreted
@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
@pytest.mark.parametrize("rows, ffn", [(70, 130), (129, 64)], ids=["edges", "row-edge"])
def test_swiglu_fp8_kernels_write_the_cast_of_their_values(rows, ffn, element):
    """Each fused kernel against the one-pass cast kernel (kernels/triton_fp8_cast.py) run on the
    fp32 values it computes: Triton's interpreter converts fp32 to FP8 with its own rounding
    (tests/test_kernels.py), so both sides go through it. Layouts, saturation and amax exactly."""
    from kernels import triton_fp8_cast, triton_fp8_swiglu

    gen = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * ffn, generator=gen) * 3).to(torch.bfloat16)
    grad = (torch.randn(rows, ffn, generator=gen) * 2).to(torch.bfloat16)
    gate_up[1, 2] = gate_up[1, ffn + 2] = grad[1, 2] = 1e4  # saturates (gate, up and their gradients)
    cases = {
        "forward": (swiglu_halves_values(gate_up),
                    lambda scale, amax: triton_fp8_swiglu.swiglu_cast_transpose(
                        gate_up, scale, FP8_DTYPES[element], FP8_MAX[element], True, amax)),
        "backward": (swiglu_halves_grad_values(gate_up, grad),
                     lambda scale, amax: triton_fp8_swiglu.swiglu_grad_cast_transpose(
                         gate_up, grad, scale, FP8_DTYPES[element], FP8_MAX[element], True, amax)),
    }
    for name, (values, fused) in cases.items():
        scale, amax, want_amax = torch.tensor(5.3), torch.tensor(1.0), torch.tensor(0.0)
        out, out_t = fused(scale, amax)
        want, _ = triton_fp8_cast.cast_transpose(values, scale, FP8_DTYPES[element], FP8_MAX[element], False, want_amax)
        assert out.shape == values.shape and out.dtype == FP8_DTYPES[element], name
        assert _same_bytes(out, want) > 0.999, name
        assert out.float().abs().max().item() == FP8_MAX[element], name  # saturated, not NaN
        assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8)), name
        torch.testing.assert_close(amax, want_amax, rtol=1e-6, atol=0)


def _fake_quant(values: torch.Tensor, amax_of: torch.Tensor, element: str) -> torch.Tensor:
    """values as FP8 holds them under the scale that maps amax_of's amax to the format's max."""
    scale = scale_from_amax(amax_of.abs().amax(), element, 0)
    return dequantize(quantize(values, scale, element), scale).double()


def _reference(x, w1, w2, grad_y, fp8_format: str, recipe: str, dtype: torch.dtype):
    """y, dx, dw1, dw2 of the MLP in float64 on the values each FP8 operand holds. GEMM outputs are
    rounded to `dtype` (autocast's). The activation and its gradient are quantized from fp32 under a
    delayed scale (the SwiGLU kernel writes FP8 itself), from `dtype` under current scaling (made,
    then cast); either way the scale comes from their amax in `dtype` (what the first, current-scaled
    call recorded)."""
    grad_element = "e5m2" if fp8_format == "hybrid" else "e4m3"
    x2d, g2d = x.detach().flatten(0, 1), grad_y.to(dtype).float().flatten(0, 1)
    xq, w1q, w2q = (_fake_quant(t, t, "e4m3") for t in (x2d, w1.detach().flatten(0, 1), w2.detach()))
    gate_up = (xq @ w1q.t()).to(dtype)

    def operand(values_fp32, element):
        rounded = values_fp32.to(dtype).float()
        return _fake_quant(values_fp32 if recipe == "delayed" else rounded, rounded, element)

    aq = operand(swiglu_halves_values(gate_up), "e4m3")
    gq = _fake_quant(g2d, g2d, grad_element)
    y = aq @ w2q.t()
    grad_act = (gq @ w2q).to(dtype)
    dq = operand(swiglu_halves_grad_values(gate_up, grad_act), grad_element)
    return y, dq @ w1q, (dq.t() @ xq).view(w1.shape), gq.t() @ aq


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "under-autocast"])
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("fp8_format", ["hybrid", "e4m3"])
def test_fp8_swiglu_mlp_equals_dequantized_reference(fp8_format, recipe, autocast):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 32, generator=gen, requires_grad=True)
    w1 = torch.nn.Parameter(torch.randn(2, 48, 32, generator=gen) * 0.2)
    w2 = torch.nn.Parameter(torch.randn(32, 48, generator=gen) * 0.2)
    grad_y = torch.randn(2, 8, 32, generator=gen) * 1e-3  # scales far from a power of two
    config = ScalingConfig(fp8_format=fp8_format, recipe=recipe)
    fc1, fc2 = Fp8LinearScaling(config), Fp8LinearScaling(config)
    for _ in range(2):  # delayed: the second call casts with the first call's amaxes, the same tensors'
        x.grad = w1.grad = w2.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fp8_swiglu_mlp(x, Fp8Weight(w1, fc1, None, False), Fp8Weight(w2, fc2, None, False), "reference")
            y.backward(grad_y)
    dtype = torch.bfloat16 if autocast else torch.float32
    want_y, want_dx, want_dw1, want_dw2 = _reference(x, w1, w2, grad_y, fp8_format, recipe, dtype)
    assert y.dtype == dtype and x.grad.dtype == torch.float32 and w1.grad.shape == w1.shape
    rtol = 1e-2 if autocast else 1e-5  # one bf16 rounding of y and of the input gradient
    torch.testing.assert_close(y.double(), want_y.view(y.shape), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_dx.view(x.shape), rtol=rtol, atol=1e-9)
    torch.testing.assert_close(w1.grad.double(), want_dw1, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(w2.grad.double(), want_dw2, rtol=1e-5, atol=1e-9)


@interpreted
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_swiglu_mlp_with_the_triton_kernels_matches_the_reference(recipe, monkeypatch):
    """The MLP with the Triton SwiGLU kernels (interpreted) against the reference. Where the
    reference quantizes the activation and its gradient it goes through the interpreted cast kernel
    too, so that both sides round fp32 to FP8 the interpreter's way (see above); the other operands
    are cast by torch on both sides. What remains is fp32 rounding of silu."""
    from kernels import fp8_swiglu, triton_fp8_cast

    def interpreted_cast(x, scale, element, transpose, amax):
        return triton_fp8_cast.cast_transpose(x, scale, FP8_DTYPES[element], FP8_MAX[element], transpose, amax)

    monkeypatch.setattr(fp8_swiglu, "cast_transpose", interpreted_cast)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 32, generator=gen)
    weights = torch.randn(2, 64, 32, generator=gen) * 0.2, torch.randn(32, 64, generator=gen) * 0.2
    grad_y = torch.randn(40, 32, generator=gen)
    results = {}
    for impl in ("reference", "triton"):
        xi = x.clone().requires_grad_()
        w1, w2 = (torch.nn.Parameter(w.clone()) for w in weights)
        fc1, fc2 = Fp8LinearScaling(ScalingConfig(recipe=recipe)), Fp8LinearScaling(ScalingConfig(recipe=recipe))
        for _ in range(2):
            xi.grad = w1.grad = w2.grad = None
            y = fp8_swiglu_mlp(xi, Fp8Weight(w1, fc1, None, False), Fp8Weight(w2, fc2, None, False), impl)
            y.backward(grad_y)
        results[impl] = [y.detach(), xi.grad, w1.grad, w2.grad]
        if recipe == "delayed":  # the amaxes the kernels recorded (the newest history entries)
            results[impl].append(fc1.histories.history[:, 0].clone())
    for got, want in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("fused", [True, False])
def test_the_model_routes_its_fp8_mlp_by_the_flag(fused):
    """--fp8-fused-swiglu picks the MLP's path: the one fused function, or two FP8 linears."""
    from benchmarks.bench_plan_gpu import backward_node_names
    from megatron_code.model.gpt import GPTModel

    model = GPTModel(_tiny(fp8_format="hybrid", fp8_fused_swiglu=fused), init_seed=0)
    tokens = torch.randint(0, 200, (2, 17), generator=torch.Generator().manual_seed(0))
    nodes = backward_node_names(model(tokens[:, :-1], labels=tokens[:, 1:]).mean())
    assert ("_Fp8SwiGLUMLPBackward" in nodes) == fused
    assert "_Fp8LinearBackward" in nodes  # the attention's linears, and the MLP's when unfused


def test_model_with_the_fused_fp8_mlp_trains_like_the_unfused_one():
    for recipe in ("delayed", "tensorwise"):
        fused = _train(_tiny(fp8_format="hybrid", fp8_recipe=recipe), 8)
        unfused = _train(_tiny(fp8_format="hybrid", fp8_recipe=recipe, fp8_fused_swiglu=False), 8)
        assert fused[0] == pytest.approx(unfused[0], rel=1e-3)
        relative = [abs(a - b) / b for a, b in zip(fused, unfused)]
        assert max(relative) < 0.01, (recipe, relative)


def test_fp8_swiglu_mlp_refuses_a_gate_up_weight_of_another_shape():
    config = ScalingConfig()
    w = torch.zeros(96, 32)
    with pytest.raises(ValueError, match=r"must be \[2, ffn, hidden\]"):
        fp8_swiglu_mlp(torch.zeros(4, 32), Fp8Weight(w, Fp8LinearScaling(config), None, False),
                       Fp8Weight(torch.zeros(32, 48), Fp8LinearScaling(config), None, False))


def test_swiglu_fp8_kernels_refuse_a_gate_up_without_two_halves():
    pytest.importorskip("triton")
    from kernels import triton_fp8_swiglu

    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="must hold gate and up halves, got 7"):
        triton_fp8_swiglu.swiglu_cast_transpose(torch.zeros(4, 7), one, torch.float8_e4m3fn, 448.0, True, None)
    with pytest.raises(ValueError, match=r"grad_y must be \[4, 3\]"):
        triton_fp8_swiglu.swiglu_grad_cast_transpose(torch.zeros(4, 6), torch.zeros(4, 6), one,
                                                     torch.float8_e4m3fn, 448.0, True, None)
