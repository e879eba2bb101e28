"""Kernels against their plain-torch references: forward values and gradients.

The Triton kernels run here on CPU through Triton's interpreter (TRITON_INTERPRET=1, ~1000x
slower than torch, so shapes are tiny; its bf16 stores truncate instead of rounding, hence the
bf16 tolerances of about one bf16 ulp). tests/test_kernels_cuda.py repeats the comparisons on a GPU
at realistic shapes."""
import importlib.util
import socket

import pytest
import torch
import torch.nn.functional as F

from kernels.cross_entropy import cross_entropy
from kernels.dispatch import KernelSelectionError, select, triton_interpreter_enabled
from kernels.linear_cross_entropy import fused_loss_impl, linear_cross_entropy, linear_cross_entropy_unfused
from kernels.weighted_linear_cross_entropy import weighted_linear_cross_entropy
from kernels.rmsnorm import rms_norm
from kernels.swiglu import swiglu
from megatron_code.errors import ConfigError
from megatron_code.model import GPTModel, ModelConfig
from tests.kernel_checks import forward_and_grads, rope_on_fused_qkv

# tests/conftest.py switches the interpreter on (before anything imports triton) on CPU-only machines.
INTERPRETER = triton_interpreter_enabled() and importlib.util.find_spec("triton") is not None
interpreted = pytest.mark.skipif(not INTERPRETER, reason="needs triton and TRITON_INTERPRET=1 (CPU-only machine)")
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def assert_all_close(got, want, dtype):
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a.float(), b.float(), **TOLERANCES[dtype], msg=lambda m: f"tensor {index}: {m}")


def test_fused_cross_entropy_matches_torch_including_masked_columns():
    torch.manual_seed(0)
    logits = torch.randn(37, 300, dtype=torch.float64)
    logits[:, 280:] = float("-inf")  # padded vocabulary columns
    targets = torch.randint(0, 280, (37,))
    weights = torch.rand(37, dtype=torch.float64)
    ours_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = cross_entropy(ours_in, targets)
    ref = F.cross_entropy(ref_in, targets, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(ours_in.grad[:, 280:] == 0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rmsnorm_matches_reference(dtype):
    """15 rows of 37 (not a power of 2): the backward's 4 programs loop over 4, 4, 4 and 3 rows."""
    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 37, dtype=dtype), 1 + 0.1 * torch.randn(37, dtype=dtype)
    got = forward_and_grads(lambda x, w: rms_norm(x, w, 1e-5, "triton"), (x, weight))
    want = forward_and_grads(lambda x, w: rms_norm(x, w, 1e-5, "reference"), (x, weight))
    assert got[0].dtype == dtype
    assert_all_close(got, want, dtype)


@interpreted
@pytest.mark.parametrize("x_dtype, delta_dtype, out_dtype", [
    (torch.float32, torch.float32, None),
    (torch.bfloat16, torch.bfloat16, None),  # the bf16 residual stream
    (torch.float32, torch.bfloat16, torch.bfloat16),  # --fp32-residual-connection under autocast
])
def test_triton_add_rms_norm_matches_add_then_reference_norm(x_dtype, delta_dtype, out_dtype):
    """The residual add fused into the norm: h = x + delta and norm(h), and the gradients of x,
    delta and the weight when both h (the residual path) and norm(h) are used downstream."""
    from kernels.rmsnorm import add_rms_norm

    torch.manual_seed(0)
    x, delta = torch.randn(3, 5, 37, dtype=x_dtype), torch.randn(3, 5, 37, dtype=delta_dtype)
    weight = 1 + 0.1 * torch.randn(37)

    def run(impl):
        return lambda x, d, w: add_rms_norm(x, d, w, 1e-5, impl, out_dtype)

    got = forward_and_grads(run("triton"), (x, delta, weight))
    want = forward_and_grads(run("reference"), (x, delta, weight))
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert got[0].dtype == torch.result_type(x, delta) and got[1].dtype == (out_dtype or got[0].dtype)
    if got[0].dtype == torch.float32:
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)  # the add itself: exact
    assert_all_close(got, want, torch.bfloat16 if torch.bfloat16 in (x_dtype, delta_dtype) else torch.float32)


@interpreted
def test_triton_rmsnorm_writes_the_autocast_dtype_as_a_cast_would():
    """fp32 residual in, bf16 out (what the layers' norms do under autocast): the fp32 result cast
    afterwards, and the same gradients (the incoming gradient is bf16). The interpreter truncates
    bf16 stores (docs/install.md), so the Triton output may sit one bf16 ulp below the rounded cast
    here; tests/test_kernels_cuda.py checks the compiled kernel on a GPU."""
    torch.manual_seed(0)
    x, weight = torch.randn(3, 5, 37), 1 + 0.1 * torch.randn(37)
    for impl in ("triton", "reference"):
        fused = forward_and_grads(lambda x, w: rms_norm(x, w, 1e-5, impl, out_dtype=torch.bfloat16), (x, weight))
        cast = forward_and_grads(lambda x, w: rms_norm(x, w, 1e-5, impl).to(torch.bfloat16), (x, weight))
        assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.float32
        ulp = 2.0 ** (torch.frexp(cast[0].float())[1] - 8)  # bf16 spacing at each value
        assert torch.all((fused[0].float() - cast[0].float()).abs() <= (ulp if impl == "triton" else 0))
        for a, b in zip(fused[1:], cast[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rope_on_strided_q_k_matches_reference(dtype):
    """GQA q/k cut out of one fused QKV tensor (as SelfAttention.split_qkv does), head dim 10."""
    torch.manual_seed(0)
    s, b, kv, q_per_kv, d = 5, 2, 2, 3, 10
    qkv = torch.randn(s, b, kv, q_per_kv + 2, d, dtype=dtype)
    angles = torch.randn(s, b, 1, d // 2).repeat(1, 1, 1, 2)
    cos, sin = angles.cos(), angles.sin()

    got = forward_and_grads(rope_on_fused_qkv("triton", q_per_kv, cos, sin), (qkv,))
    want = forward_and_grads(rope_on_fused_qkv("reference", q_per_kv, cos, sin), (qkv,))
    assert_all_close(got, want, dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv, q_per_kv", [(2, 3), (1, 1), (3, 4)])
def test_triton_split_qkv_rotary_matches_split_then_reference_rope(dtype, kv, q_per_kv):
    """Megatron's grouped QKV output split into rotated q, k and v in one pass, and its gradient
    written back into the grouped layout, against the split copies + the torch RoPE."""
    from kernels.rotary import split_qkv_rotary

    torch.manual_seed(0)
    s, b, d = 5, 2, 10
    mixed = torch.randn(s, b, kv * (q_per_kv + 2) * d, dtype=dtype)  # the QKV GEMM's output
    angles = torch.randn(s, b, 1, d // 2).repeat(1, 1, 1, 2)
    cos, sin = angles.cos(), angles.sin()

    def run(impl):
        return lambda t: split_qkv_rotary(t.view(s, b, kv, q_per_kv + 2, d), cos, sin, impl)

    got = forward_and_grads(run("triton"), (mixed,))
    want = forward_and_grads(run("reference"), (mixed,))
    assert [t.shape for t in got] == [t.shape for t in want] and all(t.is_contiguous() for t in got[:3])
    assert torch.equal(got[2], want[2])  # v is copied, not rotated
    assert_all_close(got, want, dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_swiglu_halves_gives_one_gradient_for_the_fused_output(dtype):
    """swiglu_halves (the FP8 gate/up GEMM's output read as is): the same values and gradient as
    chunking it and running the reference, the gradient one contiguous [.., 2 * ffn] tensor."""
    from kernels.swiglu import swiglu_halves

    torch.manual_seed(0)
    fused = 2 * torch.randn(3, 1, 2 * 1100, dtype=dtype)
    got = forward_and_grads(lambda t: swiglu_halves(t, "triton"), (fused,))
    want = forward_and_grads(lambda t: swiglu_halves(t, "reference"), (fused,))
    assert got[0].shape == (3, 1, 1100) and got[1].shape == fused.shape and got[1].is_contiguous()
    assert_all_close(got, want, dtype)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_swiglu_on_gemm_output_halves_matches_reference(dtype):
    """gate/up as the strided halves of one [.., 2 * ffn] output; ffn 1100 > one 1024-column block."""
    torch.manual_seed(0)
    fused = 2 * torch.randn(3, 1, 2 * 1100, dtype=dtype)

    def run(impl):
        return lambda fused: swiglu(*fused.chunk(2, dim=-1), impl=impl)

    got, want = forward_and_grads(run("triton"), (fused,)), forward_and_grads(run("reference"), (fused,))
    assert_all_close(got, want, dtype)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=interpreted)])
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_matches_unfused_with_padded_vocab(impl, autocast):
    """Blocks of 16 tokens x 128 vocabulary rows over 37 tokens x 300 rows (tails on both axes;
    rows 280+ are padding), per-token loss weights as a masking caller gives them, and bf16
    autocast GEMMs on request."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(37, 24), 0.3 * torch.randn(300, 24)
    targets = torch.randint(0, 280, (37,))

    def run(fn):
        def loss(hidden, weight):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return fn(hidden, weight)
        return loss

    fused = run(lambda h, w: linear_cross_entropy(h, w, targets, vocab_size=280, impl=impl, chunk_tokens=16,
                                                  chunk_vocab=128))
    unfused = run(lambda h, w: linear_cross_entropy_unfused(h, w, targets, vocab_size=280))
    got, want = forward_and_grads(fused, (hidden, weight)), forward_and_grads(unfused, (hidden, weight))
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.float32
    assert_all_close(got, want, torch.bfloat16 if autocast else torch.float32)
    assert torch.all(got[2][280:] == 0)  # padded rows: zero probability, no gradient


def weighted_and_reference(hidden, weight, targets, loss_weights, impl, autocast, existing_grad, **blocks):
    """(weighted scalar, per-token CE, grad hidden, weight.grad) of the forward-gradient op, and the
    same from the unfused loss through autograd; weight.grad may start from an earlier micro-batch's."""
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        w.grad = None if existing_grad is None else existing_grad.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                total, losses = weighted_linear_cross_entropy(h, w, targets, loss_weights, vocab_size=280,
                                                              impl=impl, **blocks)
            else:
                losses = linear_cross_entropy_unfused(h, w, targets, vocab_size=280)
                total = (losses * loss_weights).sum()
        total.backward()
        results.append((total.detach(), losses.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=interpreted)])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("blocks", [{}, dict(chunk_tokens=16, chunk_vocab=128)], ids=["default", "blocked"])
def test_weighted_linear_cross_entropy_makes_the_gradients_in_the_forward(impl, autocast, blocks):
    """The forward-gradient loss head against autograd through the unfused logits: the weighted
    sum, per-token losses, the hidden gradient and the weight gradient added to an earlier one
    (a second micro-batch), in one block or 3 token blocks x 3 vocabulary chunks (rows 280+ padding)."""
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 24, generator=gen), 0.3 * torch.randn(300, 24, generator=gen)
    targets = torch.randint(0, 280, (37,), generator=gen)
    loss_weights = torch.rand(37, generator=gen) * (torch.rand(37, generator=gen) > 0.2)  # a mask, scaled
    earlier = torch.randn(300, 24, generator=gen)
    for existing in (None, earlier):
        got, want = weighted_and_reference(hidden, weight, targets, loss_weights, impl, autocast, existing, **blocks)
        assert_all_close(got, want, torch.bfloat16 if autocast else torch.float32)
        assert got[3].dtype == torch.float32 and torch.equal(got[3][280:], want[3][280:])  # padding: no gradient


def test_weighted_linear_cross_entropy_refuses_a_scaled_backward_and_bad_operands():
    """Its weight gradient was added in the forward unscaled: a backward that scales the scalar
    would leave it wrong, so it fails (on the device, without a sync)."""
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.nn.Parameter(torch.randn(16, 8))
    targets = torch.randint(0, 16, (5,))
    total, _ = weighted_linear_cross_entropy(hidden, weight, targets, torch.ones(5), impl="reference")
    with pytest.raises(RuntimeError, match="gradient 1"):
        (2 * total).backward()
    with pytest.raises(ValueError, match=r"loss_weights \(4,\) must have the targets' shape \(5,\)"):
        weighted_linear_cross_entropy(hidden, weight, targets, torch.ones(4), impl="reference")
    with pytest.raises(ValueError, match="fp32 leaf"):
        weighted_linear_cross_entropy(hidden, weight.double(), targets, torch.ones(5), impl="reference")


def test_linear_cross_entropy_tp2_matches_single_process():
    """Two gloo ranks each holding half of the vocabulary (rank 1 only padding) reproduce the
    single-process unfused loss and gradients (torch reference, and Triton under the interpreter);
    so does a TP2 + SP GPTModel with the fused loss head (tests/linear_ce_tp_worker.py)."""
    import torch.multiprocessing as mp

    from tests.linear_ce_tp_worker import tp_worker

    impls = ("reference", "triton") if INTERPRETER else ("reference",)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(tp_worker, args=(2, port, impls), nprocs=2, join=True)


def tiny_config(**impls):
    return ModelConfig(num_layers=2, hidden_size=48, ffn_hidden_size=88, num_attention_heads=4,
                       group_query_attention=True, num_query_groups=2, vocab_size=100,
                       make_vocab_size_divisible_by=64, max_position_embeddings=16, **impls)


@interpreted
def test_tiny_gpt_with_all_triton_kernels_equals_reference_model():
    triton = dict(rmsnorm_impl="triton", rope_impl="triton", swiglu_impl="triton", cross_entropy_impl="triton")
    reference = dict(rmsnorm_impl="reference", rope_impl="reference", swiglu_impl="reference",
                     cross_entropy_impl="unfused")
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    results = []
    for impls in (triton, reference):
        model = GPTModel(tiny_config(**impls), init_seed=3)
        loss = model(tokens, labels=tokens.roll(-1, dims=1))
        (loss * torch.linspace(0, 1, 12)).mean().backward()
        results.append([loss.detach()] + [(name, p.grad) for name, p in model.named_parameters()])
    (loss_triton, *grads_triton), (loss_ref, *grads_ref) = results
    torch.testing.assert_close(loss_triton, loss_ref, rtol=1e-5, atol=1e-6)
    for (name, got), (_, want) in zip(grads_triton, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_auto_selects_reference_on_cpu_and_unfused_loss_head():
    assert select("rmsnorm", "auto", torch.device("cpu"), ("auto", "triton", "reference")) == "reference"
    assert fused_loss_impl("auto", torch.device("cpu")) is None
    assert fused_loss_impl("reference", torch.device("cpu")) == "reference"
    assert fused_loss_impl("unfused", torch.device("cuda")) is None


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelSelectionError, match="TRITON_INTERPRET=1"):
        swiglu(torch.ones(2), torch.ones(2), impl="triton")


@pytest.mark.parametrize("field,value,message", [
    ("rmsnorm_impl", "fused", r"--rmsnorm-impl: implementation must be one of \('auto', 'triton', 'reference'"),
    ("swiglu_impl", "te", "--swiglu-impl: implementation must be one of"),
    ("cross_entropy_impl", "liger", "--cross-entropy-impl: implementation must be one of"),
])
def test_unknown_kernel_choice_is_a_config_error(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{field: value}).validate()


@pytest.mark.parametrize("impl,install", [("te", "transformer-engine"), ("apex", "github.com/NVIDIA/apex")])
def test_missing_library_norm_names_the_install(impl, install):
    if importlib.util.find_spec({"te": "transformer_engine", "apex": "apex"}[impl]):
        pytest.skip(f"{impl} is installed here")
    with pytest.raises(ConfigError, match=install):
        tiny_config(rmsnorm_impl=impl).validate()
    with pytest.raises(KernelSelectionError, match=install):
        rms_norm(torch.ones(2, 4), torch.ones(4), 1e-5, impl=impl)


@interpreted
@pytest.mark.parametrize("shape", [(1, 1), (70, 130), (64, 3), (129, 64)])
def test_triton_byte_transpose_equals_torch(shape):
    """FP8 operands' transposes for the backward GEMMs (kernels/triton_transpose.py): tiles that
    straddle both edges; the bytes of an FP8 tensor move unchanged."""
    from kernels.dispatch import triton_module

    transpose_bytes = triton_module("triton_transpose").transpose_bytes
    raw = torch.randint(0, 256, shape, dtype=torch.uint8)
    assert torch.equal(transpose_bytes(raw), raw.t().contiguous())
    fp8 = torch.randn(shape).to(torch.float8_e4m3fn)
    got = transpose_bytes(fp8)
    assert got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), fp8.t().contiguous().view(torch.uint8))
    with pytest.raises(ValueError, match="row-major 2-D tensor of 1-byte elements"):
        transpose_bytes(torch.zeros(4, 4))


@interpreted
@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
@pytest.mark.parametrize("shape", [(70, 130), (129, 64)])
def test_triton_fp8_cast_transpose_matches_torch(shape, element):
    """kernels/triton_fp8_cast.py: cast, transpose and amax in one pass, tiles straddling both edges.
    Triton's interpreter converts fp32 to FP8 inexactly (127.65 became 64 in e4m3, where the GPU
    rounds to nearest), so here the values are checked only for saturation and sign; the layout
    and the amax exactly. tests/test_fp8_cuda.py asks for torch's bits on a GPU."""
    from kernels.dispatch import triton_module
    from kernels.fp8_scaling import FP8_DTYPES, FP8_MAX, quantize

    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 30).to(torch.bfloat16)
    x[3, 5] = 1e6  # saturates
    scale, amax = torch.tensor(3.7), torch.tensor(5.0)
    out, out_t = triton_module("triton_fp8_cast").cast_transpose(
        x, scale, FP8_DTYPES[element], FP8_MAX[element], True, amax)
    want = quantize(x, scale, element).float()
    assert out.dtype == FP8_DTYPES[element] and out.shape == x.shape and out_t.shape == x.t().shape
    assert (out.float().sign() == want.sign()).all() and (out.float().abs() <= want.abs()).all()
    assert out[3, 5].float() == FP8_MAX[element]
    assert torch.equal(out_t.view(torch.uint8), out.t().contiguous().view(torch.uint8))
    assert amax.item() == x.float().abs().max().item()
