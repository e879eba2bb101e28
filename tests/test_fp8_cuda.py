"""FP8 on a GPU: the fused Triton cast against the torch cast, the FP8 linear against its
dequantized reference, and a tiny model's loss over 50 steps in FP8 (delayed scaling advanced per
step, as the trainer runs it) against BF16.
Skipped without CUDA (Hopper or newer for the FP8 GEMM)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)",
)

# Tolerance of the 50-step comparison: mean |loss_fp8 - loss_bf16| / max(loss_bf16, 0.5) over the
# last 10 steps (the floor keeps a near-zero loss from turning noise into a large ratio).
FP8_VS_BF16_TOLERANCE = 0.02


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cast_transpose_matches_torch_cast(element, dtype):
    from kernels import triton_fp8_cast
    from kernels.fp8_scaling import FP8_DTYPES, FP8_MAX, quantize

    x = (torch.randn(4097, 515, device="cuda") * 30).to(dtype)
    x[7, 11] = 1e6  # saturates
    scale, amax = torch.tensor(3.7, device="cuda"), torch.tensor(2.0, device="cuda")
    out, out_t = triton_fp8_cast.cast_transpose(x, scale, FP8_DTYPES[element], FP8_MAX[element], True, amax)
    want = quantize(x, scale, element)
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(out_t.view(torch.uint8), want.t().contiguous().view(torch.uint8))
    assert amax.item() == x.float().abs().max().item()


def test_fp8_linear_matches_dequantized_reference_on_cuda():
    from kernels.fp8_linear import Fp8LinearScaling, fp8_linear
    from kernels.fp8_scaling import ScalingConfig, dequantize, quantize, scale_from_amax

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(256, 512, device="cuda", generator=gen, requires_grad=True)
    w = torch.randn(384, 512, device="cuda", generator=gen, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = fp8_linear(x, w, Fp8LinearScaling(ScalingConfig(recipe="tensorwise")))
    assert y.dtype == torch.bfloat16

    def fake_quant(t):
        scale = scale_from_amax(t.abs().amax(), "e4m3", 0)
        return dequantize(quantize(t, scale, "e4m3"), scale)

    torch.testing.assert_close(y.float(), fake_quant(x.detach()) @ fake_quant(w.detach()).t(), rtol=1e-2, atol=1e-1)


def _train_tiny(fp8: bool, steps: int = 50) -> list[float]:
    from megatron_code.model.config import ModelConfig
    from tests.test_fp8 import train_tiny

    config = ModelConfig(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4,
                         group_query_attention=True, num_query_groups=2, vocab_size=1024,
                         fp8_format="hybrid" if fp8 else None)
    gen = torch.Generator(device="cuda").manual_seed(0)
    # A learnable stream: each sample is a random walk of +1 steps mod vocab, so loss falls fast.
    starts = torch.randint(0, 1024, (8, 1), device="cuda", generator=gen)
    tokens = (starts + torch.arange(257, device="cuda")) % 1024
    return train_tiny(config, tokens, steps, lr=1e-3, init_seed=7, bf16=True)


def test_fp8_tiny_model_tracks_bf16_over_50_steps():
    bf16, fp8 = _train_tiny(False), _train_tiny(True)
    assert fp8[-1] < fp8[0] * 0.5
    tail = [abs(a - b) / max(b, 0.5) for a, b in zip(fp8[-10:], bf16[-10:])]
    assert sum(tail) / len(tail) < FP8_VS_BF16_TOLERANCE, (bf16[-10:], fp8[-10:])


def test_byte_transpose_on_cuda_equals_torch():
    from kernels.fp8_scaling import transposed

    x = torch.randn(4096 + 17, 1000, device="cuda").to(torch.float8_e4m3fn)
    assert torch.equal(transposed(x).view(torch.uint8), x.t().contiguous().view(torch.uint8))


@pytest.mark.parametrize("m, n", [(6144, 4096), (4096, 14336), (3584, 4096)], ids=["qkv", "fc2", "fc1-tp8"])
def test_tuned_fp8_gemm_accumulates_the_weight_gradient_of_the_7b_shapes(m, n):
    """The accumulating FP8 GEMM with its tuned tiles (e5m2 dY^T times e4m3 x^T, 4096 tokens)
    against the float64 product: fp32 promotion every BK products keeps it near exact."""
    from kernels.triton_fp8_gemm import fp8_gemm

    gen = torch.Generator(device="cuda").manual_seed(m + n)
    a = (torch.randn(m, 4096, device="cuda", generator=gen) * 1e3).to(torch.float8_e5m2)
    b = torch.randn(n, 4096, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    scale_a, scale_b = torch.tensor(3.1e-6, device="cuda"), torch.tensor(0.7, device="cuda")
    old = torch.randn(m, n, device="cuda", generator=gen)
    c = fp8_gemm(old.clone(), a, b, scale_a, scale_b, accumulate=True)
    exact = old.double() + (a.double() @ b.double().t()) * (scale_a.double() * scale_b.double())
    cublas = old + torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
    errors = [((got.double() - exact).abs().max() / exact.abs().max()).item() for got in (c, cublas)]
    # a wrong tile, scale or operand is off by O(1); one e4m3 step is 6%
    assert errors[0] < 1e-3, f"relative error {errors[0]:.2e} (cuBLAS, then an add: {errors[1]:.2e})"


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_swiglu_fp8_kernels_match_torch_casts_of_their_values(element):
    """kernels/triton_fp8_swiglu.py on the GPU against torch's cast of the fp32 SwiGLU (and its
    gradient): only silu's fp32 rounding may differ (CUDA's sigmoid is not torch's), so a few
    elements may sit one FP8 step apart, never more; layouts and amax exact."""
    from kernels import triton_fp8_swiglu
    from kernels.fp8_scaling import FP8_DTYPES, FP8_MAX, quantize
    from kernels.swiglu import swiglu_halves_grad_values, swiglu_halves_values

    gen = torch.Generator(device="cuda").manual_seed(1)
    gate_up = (torch.randn(2051, 2 * 3584, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    grad = torch.randn(2051, 3584, device="cuda", generator=gen).to(torch.bfloat16)
    scale = torch.tensor(5.3, device="cuda")
    fp8 = FP8_DTYPES[element], FP8_MAX[element]
    for values, (out, out_t), amax in (
        (swiglu_halves_values(gate_up), *_with_amax(lambda a: triton_fp8_swiglu.swiglu_cast_transpose(
            gate_up, scale, *fp8, True, a))),
        (swiglu_halves_grad_values(gate_up, grad), *_with_amax(lambda a: triton_fp8_swiglu.swiglu_grad_cast_transpose(
            gate_up, grad, scale, *fp8, True, a))),
    ):
        want = quantize(values, scale, element)
        differ = out.view(torch.uint8) != want.view(torch.uint8)
        assert differ.float().mean().item() < 1e-4
        steps = (out.view(torch.uint8).int() - want.view(torch.uint8).int()).abs()  # same sign: adjacent codes
        assert steps.max().item() <= 1
        assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
        torch.testing.assert_close(amax, values.abs().max(), rtol=1e-6, atol=0)


def _with_amax(write):
    amax = torch.zeros((), device="cuda")
    return write(amax), amax


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_swiglu_mlp_with_triton_kernels_matches_the_reference_on_cuda(recipe):
    """The fused FP8 MLP (kernels/fp8_mlp.py) with the Triton SwiGLU kernels against the torch
    reference of the same computation, under bf16 autocast, second call (delayed scales in use)."""
    from kernels.fp8_linear import Fp8LinearScaling, Fp8Weight
    from kernels.fp8_mlp import fp8_swiglu_mlp
    from kernels.fp8_scaling import ScalingConfig

    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(2048, 1024, device="cuda", generator=gen)
    weights = (torch.randn(2, 2816, 1024, device="cuda", generator=gen) * 0.03,
               torch.randn(1024, 2816, device="cuda", generator=gen) * 0.03)
    grad_y = torch.randn(2048, 1024, device="cuda", generator=gen)
    results = {}
    for impl in ("reference", "triton"):
        xi = x.clone().requires_grad_()
        w1, w2 = (torch.nn.Parameter(w.clone()) for w in weights)
        fc1, fc2 = (Fp8LinearScaling(ScalingConfig(recipe=recipe)) for _ in range(2))
        for _ in range(2):
            xi.grad = w1.grad = w2.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fp8_swiglu_mlp(xi, Fp8Weight(w1, fc1, None, False), Fp8Weight(w2, fc2, None, False), impl)
            y.backward(grad_y)
        results[impl] = [y.float(), xi.grad, w1.grad, w2.grad]
    for got, want in zip(results["triton"], results["reference"]):
        error = ((got - want).norm() / want.norm()).item()
        assert error < 1e-3, error  # a few FP8 elements one step apart (silu's rounding); a bug is O(1)
