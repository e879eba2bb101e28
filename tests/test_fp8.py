"""FP8 (torch backend): scaling arithmetic, the FP8 linear against a dequantized fp32 reference, and
a tiny model training in FP8 next to fp32. `torch._scaled_mm` runs on CPU, so all of it runs in CI;
tests/test_fp8_cuda.py repeats the model comparison on a GPU in BF16."""
import pytest
import torch

from kernels.fp8_linear import Fp8LinearScaling, fp8_linear
from kernels.fp8_scaling import (
    FP8_MAX, ScalingConfig, TensorScaling, cast_transpose, dequantize, new_histories, quantize, scale_from_amax,
)
from megatron_code.errors import ConfigError
from megatron_code.model.config import ModelConfig
from megatron_code.model.gpt import GPTModel
from megatron_code.parallel.fused_wgrad import cached_weight_casts
from tests.conftest import run_training, tiny_run


def test_scale_maps_amax_to_format_max_with_margin():
    assert scale_from_amax(torch.tensor(448.0), "e4m3", 0).item() == 1.0
    assert scale_from_amax(torch.tensor(448.0), "e4m3", 1).item() == 0.5
    assert scale_from_amax(torch.tensor(2.0), "e5m2", 0).item() == 57344.0 / 2
    for degenerate in (0.0, float("inf"), float("nan"), 1e-38):  # 1e-38: the scale would overflow
        assert scale_from_amax(torch.tensor(degenerate), "e4m3", 0).item() == 1.0


def test_quantize_saturates_instead_of_overflowing():
    big = torch.tensor([1e6, -1e6, 3.0])
    for element in ("e4m3", "e5m2"):
        q = dequantize(quantize(big, torch.tensor(1.0), element), torch.tensor(1.0))
        assert q.tolist() == [FP8_MAX[element], -FP8_MAX[element], 3.0]


def test_quantize_round_trip_error_is_within_half_an_ulp():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    scale = scale_from_amax(x.abs().amax(), "e4m3", 0)
    back = dequantize(quantize(x, scale, "e4m3"), scale)
    normal = x.abs() * scale > 2.0 ** -6  # e4m3's smallest normal; subnormals have absolute error
    relative = ((back - x).abs() / x.abs())[normal]
    assert relative.max() <= 2.0 ** -4 + 1e-6  # 3 mantissa bits


def test_cast_transpose_writes_both_layouts_and_folds_the_amax():
    x = torch.tensor([[1.0, -6.0, 2.5], [0.5, 3.0, -1.0]])
    amax = torch.tensor(4.0)  # earlier casts of the step; the larger one wins
    data, data_t = cast_transpose(x, torch.tensor(2.0), "e4m3", transpose=True, amax=amax)
    assert torch.equal(data.float(), quantize(x, torch.tensor(2.0), "e4m3").float())
    assert torch.equal(data_t.float(), data.float().t()) and data_t.is_contiguous()
    assert amax.item() == 6.0
    assert cast_transpose(x, torch.tensor(2.0), "e4m3", transpose=False)[1] is None


def _scales(slot: TensorScaling, amaxes):
    return [slot.cast(torch.tensor([[a, -a / 2]])).scale.item() for a in amaxes]


def test_delayed_scaling_uses_history_max_and_lags_one_use():
    slot = TensorScaling(ScalingConfig(recipe="delayed", amax_history_len=2), is_gradient=False)
    # First use falls back to its own amax; later uses see only earlier amaxes (max of the last 2).
    assert _scales(slot, [4.0, 8.0, 1.0, 1.0, 1.0]) == [448 / 4, 448 / 4, 448 / 8, 448 / 8, 448 / 1]


def test_delayed_most_recent_and_tensorwise():
    recent = TensorScaling(ScalingConfig(amax_compute_algo="most_recent"), is_gradient=False)
    assert _scales(recent, [4.0, 8.0, 2.0]) == [448 / 4, 448 / 4, 448 / 8]
    current = TensorScaling(ScalingConfig(fp8_format="e4m3", recipe="tensorwise"), is_gradient=True)
    assert current.element == "e4m3"  # e4m3 format: gradients too
    assert _scales(current, [4.0, 8.0]) == [448 / 4, 448 / 8]
    assert TensorScaling(ScalingConfig(fp8_format="hybrid"), is_gradient=True).element == "e5m2"


def test_inside_a_step_delayed_scales_stay_fixed_and_histories_advance_once():
    """What the trainer's step context does (cached_weight_casts sets `active`, advances at exit)."""
    histories = new_histories(ScalingConfig(amax_history_len=4))
    slot = TensorScaling(ScalingConfig(amax_history_len=4), is_gradient=False, histories=histories)
    other = TensorScaling(ScalingConfig(amax_history_len=4), is_gradient=True, histories=histories)

    def step(amaxes):
        histories.active = True
        scales = [slot.cast(torch.tensor([[a, -a / 4]])).scale.item() for a in amaxes]
        histories.active = False
        histories.advance()
        return scales

    assert step([4.0, 2.0]) == [448 / 4, 448 / 2]  # no history yet: each cast uses its own amax
    assert step([8.0, 1.0]) == [448 / 4, 448 / 4]  # fixed for the step: the max of step 1
    assert step([1.0, 1.0]) == [448 / 8, 448 / 8]  # max over the history (8, 4)
    assert histories.history[slot.slot].tolist() == [1.0, 8.0, 4.0, 0.0]  # newest first
    assert histories.history[other.slot].tolist() == [0.0] * 4 and not histories.initialized[other.slot]
    assert slot.uses == 6
    # cuBLASLt refuses FP8 scale pointers that are not 16-byte aligned: each slot's cell starts a row
    cells = [histories.cell("scale_inv", i, torch.device("cpu")) for i in (slot.slot, other.slot)]
    assert all(cell.data_ptr() % 16 == 0 for cell in cells)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "under-autocast"])
@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
@pytest.mark.parametrize("fp8_format", ["hybrid", "e4m3"])
def test_fp8_linear_equals_dequantized_reference(fp8_format, recipe, autocast):
    """Also under bf16 autocast, forward and backward inside it: the output is bf16 then, but the
    GEMMs' scales must stay fp32 (CPU's autocast once rounded them to bf16, up to 2^-9 each)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 32, generator=gen, requires_grad=True)
    w = torch.randn(48, 32, generator=gen, requires_grad=True)
    grad_y = torch.randn(2, 8, 48, generator=gen) * 1e-3  # scales far from a power of two
    scaling = Fp8LinearScaling(ScalingConfig(fp8_format=fp8_format, recipe=recipe))
    for _ in range(2):  # delayed: the second call casts with the first call's amaxes, the same ones
        x.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fp8_linear(x, w, scaling)
            y.backward(grad_y)

    def fake_quant(t, element):  # the values FP8 can hold, in fp32
        scale = scale_from_amax(t.abs().amax(), element, 0)
        return dequantize(quantize(t, scale, element), scale)

    xq, wq = fake_quant(x.detach(), "e4m3"), fake_quant(w.detach(), "e4m3")
    # under autocast y is bf16, and so is the gradient autograd hands its backward
    gq = fake_quant(grad_y.to(y.dtype).float(), "e5m2" if fp8_format == "hybrid" else "e4m3")
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(y.float(), xq @ wq.t(), rtol=1e-2 if autocast else 1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(w.grad, gq.flatten(0, 1).t() @ xq.flatten(0, 1), rtol=1e-5, atol=1e-7)


def _tiny(**fp8):
    return ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       group_query_attention=True, num_query_groups=2, vocab_size=200, **fp8)


def train_tiny(config: ModelConfig, tokens: torch.Tensor, steps: int, lr: float, init_seed: int,
               bf16: bool = False) -> list[float]:
    """Losses of `steps` AdamW steps on one batch of tokens [b, s + 1] (on tokens' device)."""
    model = GPTModel(config, init_seed=init_seed).to(tokens.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with cached_weight_casts(model):  # the trainer's step context: FP8 scales advance once per step
            with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(tokens[:, :-1], labels=tokens[:, 1:]).mean()
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _train(config: ModelConfig, steps: int) -> list[float]:
    tokens = torch.randint(0, 200, (4, 33), generator=torch.Generator().manual_seed(0))
    return train_tiny(config, tokens, steps, lr=3e-3, init_seed=3)


def test_fp8_model_trains_like_fp32():
    reference = _train(_tiny(), 15)
    for recipe in ("delayed", "tensorwise"):
        fp8 = _train(_tiny(fp8_format="hybrid", fp8_recipe=recipe), 15)
        assert fp8[-1] < reference[0] - 2.0  # it learns
        relative = [abs(a - b) / a for a, b in zip(fp8, reference)]
        assert max(relative) < 0.03, (recipe, relative)


def test_first_and_last_layers_stay_in_bf16_and_state_dict_is_unchanged():
    config = _tiny(fp8_format="hybrid", num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    model = GPTModel(config)
    in_fp8 = {i: model.decoder.layers[str(i)].mlp.linear_fc2.fp8 is not None for i in range(3)}
    assert in_fp8 == {0: False, 1: True, 2: False}
    assert model.decoder.layers["1"].self_attention.linear_qkv.fp8 is not None
    assert model.state_dict().keys() == GPTModel(_tiny()).state_dict().keys()


@pytest.mark.parametrize("change, message", [
    (dict(fp8_format="e5m2"), "--fp8-format must be one of"),
    (dict(fp8_format="hybrid", fp8_recipe="mxfp8"), "--fp8-recipe must be one of"),
    (dict(fp8_format="hybrid", num_layers_at_start_in_bf16=2, num_layers_at_end_in_bf16=2), "at most --num-layers"),
    (dict(fp8_format="hybrid", fp8_backend="tex"), "--fp8-backend must be one of"),
    (dict(fp8_format="hybrid", fp8_wgrad_impl="cublas"), r"--fp8-wgrad-impl: implementation must be one of"),
])
def test_bad_fp8_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        _tiny(**change).validate()


def test_fp8_run_resumes_exactly_with_its_amax_histories(fixture_data, tmp_path):
    """Delayed scaling's amax histories are part of the state: a run saved at step 3 and resumed
    continues with the scales the uninterrupted run has (else its first resumed step would fall
    back to current scaling and every later loss would drift)."""
    values = tiny_run(fixture_data, fp8_format="hybrid", train_iters=6, lr_warmup_iters=1, micro_batch_size=2,
                      global_batch_size=4, seq_length=64)
    full = run_training(values)
    ckpt = str(tmp_path / "ckpt")
    first = run_training({**values, "save": ckpt, "exit_interval": 3})
    resumed = run_training({**values, "save": ckpt, "load": ckpt})
    assert [r["step"] for r in first + resumed] == list(range(1, 7))
    assert [r["loss"] for r in first + resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in full[3:]]


def test_fp8_with_bf16_parameters_trains_like_fp8_with_fp32_parameters(fixture_data):
    """FP8 layers over bf16 parameters (ZeRO-1's master weights): the FP8 weight-gradient GEMMs
    accumulate into main_grad (kernels/grad_accumulation.py), the weights are cast to FP8 from bf16;
    the run follows the fp32-parameter FP8 run within bf16 rounding."""
    values = tiny_run(fixture_data, fp8_format="hybrid", bf16=True, use_distributed_optimizer=True, train_iters=6,
                      lr_warmup_iters=1, micro_batch_size=2, global_batch_size=4, seq_length=64)
    fp32, bf16 = run_training(values), run_training({**values, "params_dtype": "bfloat16"})
    for got, want in zip(bf16, fp32):
        assert got["loss"] == pytest.approx(want["loss"], rel=5e-3)
    assert fp32[-1]["loss"] < fp32[0]["loss"] - 0.5


def test_fp8_run_resumed_from_a_bf16_checkpoint_starts_its_histories_afresh(fixture_data, tmp_path, capsys):
    values = tiny_run(fixture_data, train_iters=4, lr_warmup_iters=1, micro_batch_size=2, global_batch_size=4,
                      seq_length=64, save=str(tmp_path / "ckpt"))
    run_training({**values, "exit_interval": 3})
    capsys.readouterr()
    resumed = run_training({**values, "load": values["save"], "fp8_format": "hybrid"})
    assert [r["step"] for r in resumed] == [4]
    assert "FP8 amax histories not restored (the checkpoint has none)" in capsys.readouterr().out


def test_fp8_histories_saved_under_another_format_are_not_restored(fixture_data, tmp_path, capsys):
    """A scale made for hybrid's E5M2 gradients (max 57344) would overflow E4M3 (max 448)."""
    values = tiny_run(fixture_data, fp8_format="hybrid", train_iters=4, lr_warmup_iters=1, micro_batch_size=2,
                      global_batch_size=4, seq_length=64, save=str(tmp_path / "ckpt"))
    run_training({**values, "exit_interval": 3})
    capsys.readouterr()
    resumed = run_training({**values, "load": values["save"], "fp8_format": "e4m3"})
    assert [r["step"] for r in resumed] == [4]
    assert ("FP8 amax histories not restored (saved with other FP8 settings: --fp8-format hybrid (now e4m3))"
            in capsys.readouterr().out)
