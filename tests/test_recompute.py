"""Activation recompute (--recompute-granularity full|selective): the same losses and gradients as
storing every activation (dropout included: checkpointing replays the RNG), Megatron's rules for
which layers are recomputed, and clear errors for bad flag combinations."""
import pytest
import torch

from megatron_code.errors import ConfigError
from megatron_code.model import GPTModel
from megatron_code.model.config import ModelConfig
from tests.conftest import run_training, tiny_run
from tests.test_parallel import torchrun

TINY = dict(num_layers=4, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, group_query_attention=True,
            num_query_groups=2, vocab_size=256, untie_embeddings_and_output_weights=True,
            hidden_dropout=0.1, attention_dropout=0.1)
RECOMPUTE = {
    "selective": dict(recompute_granularity="selective"),
    "full_uniform_1": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_uniform_3": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3),
    "full_block_2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}


def loss_and_grads(config: ModelConfig, segment_ids=None):
    model = GPTModel(config, init_seed=3)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 32), generator=generator)
    labels = torch.randint(0, config.vocab_size, (2, 32), generator=generator)
    torch.manual_seed(7)  # the dropout masks
    loss = model(tokens, segment_ids=segment_ids, labels=labels).mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same_as_without_recompute(recompute: dict, segment_ids=None) -> None:
    want_loss, want_grads = loss_and_grads(ModelConfig(**TINY), segment_ids)
    got_loss, got_grads = loss_and_grads(ModelConfig(**TINY, **recompute), segment_ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    for param, grad in want_grads.items():
        torch.testing.assert_close(got_grads[param], grad, rtol=1e-6, atol=1e-9, msg=param)


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_recompute_gives_the_same_loss_and_gradients(name):
    assert_same_as_without_recompute(RECOMPUTE[name])


def test_selective_recompute_with_document_masks_matches():
    assert_same_as_without_recompute(RECOMPUTE["selective"], torch.tensor([[0] * 12 + [1] * 20, [0] * 32]))


def forward_calls_per_layer(model: GPTModel, train: bool) -> dict[str, int]:
    """How many times each layer's forward started in one forward + backward (a pre-hook: the
    checkpoint's rerun stops early once it has rebuilt what backward needs)."""
    calls = {name: 0 for name in model.decoder.layers}
    for name, layer in model.decoder.layers.items():
        layer.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    model.train(train)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16))
    model(tokens, labels=tokens).sum().backward()
    return calls


@pytest.mark.parametrize("method, count, recomputed", [
    ("uniform", 1, {"2", "3", "4", "5"}),
    ("uniform", 3, {"2", "3", "4", "5"}),
    ("block", 1, {"2"}),  # the first layer of this stage, counted within the stage
    ("block", 3, {"2", "3", "4"}),
])
def test_full_recompute_reruns_megatrons_choice_of_layers(method, count, recomputed):
    config = ModelConfig(**{**TINY, "num_layers": 8}, recompute_granularity="full", recompute_method=method,
                         recompute_num_layers=count)
    stage = GPTModel(config, layer_indices=range(2, 6))  # a pipeline stage holding layers 2-5
    calls = forward_calls_per_layer(stage, train=True)
    assert {name for name, n in calls.items() if n == 2} == recomputed
    assert all(n == 1 for name, n in calls.items() if name not in recomputed)


def test_no_recompute_in_eval_mode():
    config = ModelConfig(**TINY, **RECOMPUTE["full_uniform_1"])
    calls = forward_calls_per_layer(GPTModel(config), train=False)
    assert set(calls.values()) == {1}


@pytest.mark.parametrize("changes, message", [
    (dict(recompute_granularity="some"), "--recompute-granularity must be one of"),
    (dict(recompute_granularity="full"), "needs --recompute-method"),
    (dict(recompute_granularity="full", recompute_method="uniform"), "--recompute-num-layers between 1 and"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=5), "between 1 and"),
    (dict(recompute_granularity="selective", recompute_num_layers=1), "drop --recompute-method"),
    (dict(recompute_method="uniform"), "need --recompute-granularity full"),
])
def test_bad_recompute_flags_raise_clear_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**TINY, **changes).validate()


def test_pipeline_with_full_recompute_matches_single_process(fixture_data, tmp_path):
    common = dict(train_iters=2, micro_batch_size=2, global_batch_size=8, seq_length=64)
    reference = run_training(tiny_run(fixture_data, **common))
    layout = dict(pipeline_model_parallel_size=2, recompute_granularity="full", recompute_method="uniform",
                  recompute_num_layers=1)
    records = torchrun(2, tiny_run(fixture_data, **common, **layout), str(tmp_path / "m.jsonl"))
    for got, want in zip(records, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
