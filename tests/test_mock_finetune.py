"""--mock-data under --training-mode sft and dpo (synthetic conversations, for profiling without
data): the real SFT/DPO datasets pack and mask them as they do exported data, every conversation
fits, the same seed gives the same samples, DPO's reference is the policy's initial weights (the
first loss is log 2), and `megatron_code.profile` runs both modes (with export data too) and counts
a DPO pair as two sequences."""
import json
import math

import numpy as np
import pytest
import torch

from data_tools.export import ExportConfig, export
from megatron_code.errors import ConfigError
from megatron_code.profile import main as profile_main
from megatron_code.training.arguments import run_config_from_values
from megatron_code.training.data import SyntheticVocabulary
from megatron_code.training.finetune_data import build_finetune_datasets
from megatron_code.training.mock_conversations import MockConversations, synthetic_chat_format
from megatron_code.training.validate import validate_run
from tests.conftest import TOKENIZER, run_training, tiny_run
from tests.test_sft_dpo import handmade_samples

SEQ = 128
MOCK = dict(data_path=[], tokenizer_model=None, vocab_size=2048, mock_data=True, seq_length=SEQ,
            micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-4, lr_warmup_iters=1, log_interval=1000)


def mock_values(mode: str, **overrides) -> dict:
    return tiny_run("", **{**MOCK, "training_mode": mode, "train_iters": 3, **overrides})


def built(values: dict, samples: int):
    cfg = run_config_from_values(values)
    tokenizer = validate_run(cfg)
    return build_finetune_datasets(cfg, tokenizer, [samples, 0, 0], need_valid=False).train, cfg


def test_mock_conversations_fit_end_with_eod_and_repeat_with_the_seed():
    chat = synthetic_chat_format()
    source = MockConversations("dpo", 2048, 2, SEQ, chat.overhead, seed=7)
    assert chat.overhead == 13  # what the fixture tokenizer's ChatML format adds
    assert source.longest(chat.overhead).max() <= SEQ + 1
    assert len(set(source.longest(chat.overhead).tolist())) > 20  # lengths vary as real ones do
    prompt, (chosen, rejected) = source.get(5)
    assert 2 not in prompt.tolist() and chosen[-1] == 2 and rejected[-1] == 2
    assert 2 not in chosen[:-1].tolist() and prompt.min() >= 16 and chosen.max() < 2048
    again = MockConversations("dpo", 2048, 2, SEQ, chat.overhead, seed=7).get(5)
    assert all(np.array_equal(a, b) for a, b in zip([prompt, chosen, rejected], [again[0], *again[1]]))
    with pytest.raises(ConfigError, match="--seq-length 8 leaves"):
        MockConversations("sft", 2048, 2, 8, chat.overhead, seed=7)


def test_sft_mock_rows_pack_conversations_and_mask_exactly_the_responses():
    train, cfg = built(mock_values("sft", reset_position_ids=True, reset_attention_mask=True), samples=12)
    assert isinstance(validate_run(run_config_from_values(mock_values("sft"))), SyntheticVocabulary)
    source = MockConversations("sft", 2048, 2, SEQ, synthetic_chat_format().overhead, cfg.training.seed)
    packed = []
    for row in range(len(train)):
        sample, members = train[row], train.row_records(row)
        packed.append(len(members))
        assert sample["tokens"].shape == (SEQ,)
        # The masked labels are the members' responses, in order, each ending with EOD.
        responses = [source.get(int(m))[1][0] for m in members]
        masked = sample["labels"][sample["loss_mask"].bool()]
        assert masked.tolist() == np.concatenate(responses).tolist()
        starts = (sample["position_ids"] == 0).nonzero().flatten().tolist()
        assert len(starts) >= len(members)  # positions restart per conversation (and in the padding)
    assert max(packed) >= 2  # short conversations share rows
    again, _ = built(mock_values("sft", reset_position_ids=True, reset_attention_mask=True), samples=12)
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(len(train)))


def test_dpo_on_mock_data_uses_the_initial_weights_as_reference_and_learns():
    history = run_training(mock_values("dpo", train_iters=6))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert history[0]["reward_margin"] == 0.0
    assert history[-1]["loss"] < history[0]["loss"]


def test_mock_data_and_an_export_exclude_each_other():
    with pytest.raises(ConfigError, match="--mock-data .* and --sft-data-path exclude each other"):
        validate_run(run_config_from_values(mock_values("sft", sft_data_path=["x"])))
    with pytest.raises(ConfigError, match="--eod-mask-loss belongs to pretraining"):
        validate_run(run_config_from_values(mock_values("dpo", eod_mask_loss=True)))


def profile_report(tmp_path, *flags) -> dict:
    report = tmp_path / "report.json"
    common = ["--preset", "tiny", "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
              "--num-workers", "0", "--profile-steps", "2", "--profile-warmup", "1", "--report", str(report)]
    assert profile_main([*common, *flags]) == 0
    return json.loads(report.read_text())


def test_profile_runs_sft_on_an_export_and_dpo_on_mock_data(tmp_path):
    handmade_samples(str(tmp_path / "samples.jsonl"))
    (tmp_path / "work").mkdir()
    exported = str(tmp_path / "out")
    export([str(tmp_path / "samples.jsonl")], exported, ExportConfig(tokenizer=TOKENIZER, formats=["sft"]),
           str(tmp_path / "work"), progress=False)
    sft = profile_report(tmp_path, "--training-mode", "sft", "--sft-data-path", f"{exported}/sft",
                         "--tokenizer-model", TOKENIZER, "--reset-attention-mask", "--reset-position-ids")
    assert (sft["training_mode"], sft["mock_data"]) == ("sft", False)
    dpo = profile_report(tmp_path, "--training-mode", "dpo", "--vocab-size", "2048")
    assert (dpo["training_mode"], dpo["mock_data"]) == ("dpo", True)
    assert {"forward", "reference-forward", "backward"} <= dpo["phase_ms"].keys()
    pair_tokens = 4 * 2 * SEQ  # global batch of 4 pairs, two sequences each
    assert dpo["tokens_per_sec_per_gpu"] == pytest.approx(pair_tokens / (dpo["step_ms_median"] / 1000))


@pytest.mark.parametrize("flags", [
    {}, {"cross_entropy_impl": "reference", "untie_embeddings_and_output_weights": False},
    {"fp32_residual_connection": True}], ids=["default", "fused-head-tied", "fp32-residual"])
def test_dpo_reference_keeps_its_gemm_weights_in_bf16_with_the_same_log_probs(flags):
    """Under --bf16 the reference stores what autocast casts anyway in bf16: the first DPO loss is
    still exactly log 2 (its log-probs equal the policy's), whatever the loss head and residual dtype."""
    from megatron_code.training import trainer as trainer_module

    kept = {}
    original = trainer_module.Trainer.run

    def run(self):
        kept.update({name: p.dtype for name, p in self.reference.named_parameters()})
        return original(self)

    trainer_module.Trainer.run = run
    try:
        history = run_training(mock_values("dpo", train_iters=2, bf16=True, **flags))
    finally:
        trainer_module.Trainer.run = original
    # Rewards are beta x (policy - reference) log-probs: exactly zero only if the two are identical.
    assert (history[0]["reward_chosen"], history[0]["reward_rejected"]) == (0.0, 0.0)
    assert history[0]["loss"] == torch.tensor(math.log(2)).item()  # log 2 in fp32
    assert kept["decoder.layers.0.self_attention.linear_qkv.weight"] == torch.bfloat16
    assert kept["decoder.layers.0.mlp.linear_fc1.weight"] == torch.bfloat16
    assert kept["decoder.layers.0.input_layernorm.weight"] == torch.float32
    table = kept["embedding.word_embeddings.weight"]
    assert table == (torch.float32 if flags.get("fp32_residual_connection") else torch.bfloat16)
