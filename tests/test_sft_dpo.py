"""SFT and DPO (--training-mode sft/dpo) on files written by the data tools' export: the SFT loss
covers exactly the response tokens, falls, resumes exactly and matches under TP2; DPO starts at
log 2 with the policy equal to its reference, learns to prefer the chosen responses, equals an
independent computation from the model's log-probs and matches under DP2; bad inputs fail early."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from data_tools.export import ExportConfig, export
from megatron_code.errors import ConfigError
from megatron_code.model import GPTModel
from megatron_code.parallel.layers import SINGLE
from megatron_code.training import checkpointing
from megatron_code.training.arguments import run_config_from_values
from megatron_code.training.finetune_checks import saved_training_mode
from megatron_code.training.finetune_data import blend_indices, build_finetune_datasets
from megatron_code.training.validate import validate_run
from tests.conftest import TOKENIZER, run_training, tiny_run
from tests.test_parallel import torchrun

PROBLEMS = 40
# Small steps, no document crossing: what every SFT/DPO run of this file shares.
COMMON = dict(data_path=[], seq_length=128, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-4,
              lr_warmup_iters=1, split="90,10,0", log_interval=1000)
SFT = dict(COMMON, training_mode="sft", train_iters=8, reset_attention_mask=True, reset_position_ids=True)


def handmade_samples(path: str) -> None:
    """One passing and one failing solution per problem, as the validate stage leaves them."""
    with open(path, "w") as fh:
        for i in range(PROBLEMS):
            problem = f"Write a Python function f{i}(x) that returns x times {i} plus {i % 7}."
            solutions = {"pass": f"def f{i}(x):\n    return x * {i} + {i % 7}\n",
                         "fail": f"def f{i}(x):\n    return x + {i}\n"}
            for verdict, solution in solutions.items():
                fh.write(json.dumps({"id": f"{verdict}-{i:02d}", "problem": problem, "solution": solution,
                                     "execution": {"verdict": verdict}}) + "\n")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    """The export directory: sft_{prompt,response}_document, dpo_{prompt,chosen,rejected}_document."""
    root = tmp_path_factory.mktemp("export")
    handmade_samples(str(root / "samples.jsonl"))
    work = root / "work"
    work.mkdir()
    export([str(root / "samples.jsonl")], str(root / "out"), ExportConfig(tokenizer=TOKENIZER, formats=["sft", "dpo"]),
           str(work), progress=False)
    return str(root / "out")


@pytest.fixture(scope="module")
def pretrained(fixture_data, tmp_path_factory) -> str:
    ckpt = str(tmp_path_factory.mktemp("pretrain") / "ckpt")
    run_training(tiny_run(fixture_data, train_iters=2, seq_length=128, micro_batch_size=2, global_batch_size=4,
                          save=ckpt))
    return ckpt


def sft_values(exported, **overrides) -> dict:
    return tiny_run("", **{**SFT, "sft_data_path": [f"{exported}/sft"], **overrides})


@pytest.fixture(scope="module")
def sft_full(exported, pretrained, tmp_path_factory):
    """8 SFT steps from the pretraining weights, saved at the end: (history, checkpoint)."""
    ckpt = str(tmp_path_factory.mktemp("sft") / "ckpt")
    history = run_training(sft_values(exported, load=pretrained, finetune=True, save=ckpt))
    return history, ckpt


def torchrun_job(nproc: int, values: dict, metrics: str) -> list[dict]:
    """tests.test_parallel's torchrun without the empty --data-path (a flag needs values)."""
    return torchrun(nproc, {k: v for k, v in values.items() if v != []}, metrics)


def resolved(values: dict):
    cfg = run_config_from_values(values)
    return cfg, validate_run(cfg)


# ---- SFT -----------------------------------------------------------------------------------------
def test_sft_loss_mask_covers_exactly_the_response_tokens(exported):
    cfg, tokenizer = resolved(sft_values(exported))
    train = build_finetune_datasets(cfg, tokenizer, [12, 0, 0], need_valid=False).train
    with open(f"{exported}/sft.jsonl") as fh:
        solutions = [json.loads(line)["messages"][1]["content"] for line in fh]
    for row in range(len(train)):
        sample, records = train[row], train.row_records(row).tolist()
        assert len(records) >= 2  # conversations are packed
        masked = sample["labels"][sample["loss_mask"] == 1]
        responses = [train.conversations.get(r)[1][0] for r in records]
        assert masked.tolist() == np.concatenate(responses).tolist()
        eod_ends = (sample["tokens"] == tokenizer.eod).nonzero().flatten().tolist()
        starts = [0] + [end + 1 for end in eod_ends]  # each conversation after the first starts after an EOD
        starts = [start for start in starts if start < len(sample["tokens"])]
        assert (sample["position_ids"][starts] == 0).all()
        assert [int(sample["tokens"][s]) for s in starts[:len(records)]] == [tokenizer.bos] * len(records)
        texts = tokenizer.decode(masked.tolist())
        assert texts == "".join(solutions[r] for r in records)  # the EOD decodes to nothing


def test_sft_loss_falls_from_pretrained_weights(sft_full):
    history, ckpt = sft_full
    losses = [r["loss"] for r in history]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 1.0, losses
    assert saved_training_mode(ckpt) == "sft" and checkpointing.latest_iteration(ckpt) == 8


def test_sft_resume_reproduces_the_uninterrupted_run(exported, pretrained, sft_full, tmp_path):
    full, _ = sft_full
    ckpt = str(tmp_path / "ckpt")
    first = run_training(sft_values(exported, load=pretrained, finetune=True, save=ckpt, exit_interval=4))
    second = run_training(sft_values(exported, load=ckpt, save=ckpt))
    assert [r["step"] for r in first + second] == list(range(1, 9))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in first + second] == [r["grad_norm"] for r in full]


def test_sft_tensor_and_pipeline_parallel_match_one_process(exported, pretrained, sft_full, tmp_path):
    """TP2 + SP x PP2: the loss mask reaches the pipeline's last stage as IGNORE_LABEL."""
    full, _ = sft_full
    values = sft_values(exported, load=pretrained, finetune=True, exit_interval=3,
                        tensor_model_parallel_size=2, sequence_parallel=True, pipeline_model_parallel_size=2)
    records = torchrun_job(4, values, str(tmp_path / "m.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    for got, want in zip(records, full):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def test_blend_follows_weights_and_the_seed(exported):
    dataset_index, _ = blend_indices([0.75, 0.25], 400)
    assert np.bincount(dataset_index).tolist() == [300, 100]
    rows = {}
    for seed in (1, 1, 2):
        cfg, tokenizer = resolved(sft_values(exported, seed=seed, sft_data_path=["3", f"{exported}/sft", "1",
                                                                                 f"{exported}/sft"]))
        train = build_finetune_datasets(cfg, tokenizer, [8, 0, 0], need_valid=False).train
        rows.setdefault(seed, []).append([train[i]["tokens"].tolist() for i in range(len(train))])
    assert rows[1][0] == rows[1][1] and rows[1][0] != rows[2][0]


# ---- DPO -----------------------------------------------------------------------------------------
def dpo_values(exported, **overrides) -> dict:
    return tiny_run("", **{**COMMON, "training_mode": "dpo", "dpo_data_path": [f"{exported}/dpo"],
                           "train_iters": 6, **overrides})


def response_log_probs(model: GPTModel, sample: dict) -> torch.Tensor:
    """Plain torch: [2] summed log-probs of the (chosen, rejected) responses from the full logits."""
    logits = model(sample["tokens"]).double()  # [2, s, V]
    token_log_probs = torch.log_softmax(logits, dim=-1).gather(-1, sample["labels"][..., None]).squeeze(-1)
    return (token_log_probs * sample["loss_mask"]).sum(dim=-1)


@torch.no_grad()
def dpo_loss_by_hand(cfg, tokenizer, policy_ckpt, reference_ckpt, step) -> float:
    """The mean DPO loss of global batch `step` (1-based) for the weights in the two checkpoints."""
    models = []
    for ckpt in (policy_ckpt, reference_ckpt):
        model = GPTModel(cfg.model, SINGLE)
        checkpointing.load_checkpoint(ckpt, model, None, SINGLE, restore_rng=False)
        models.append(model.eval())
    gbs, beta = cfg.training.global_batch_size, cfg.training.dpo_beta
    train = build_finetune_datasets(cfg, tokenizer, [gbs * cfg.training.train_iters, 0, 0], need_valid=False).train
    losses = []
    for index in range((step - 1) * gbs, step * gbs):
        (policy_c, policy_r), (ref_c, ref_r) = (response_log_probs(m, train[index]) for m in models)
        margin = beta * ((policy_c - ref_c) - (policy_r - ref_r))
        losses.append(math.log1p(math.exp(-float(margin))))  # -log sigmoid(margin)
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def dpo_first(exported, sft_full, tmp_path_factory):
    """5 of 6 DPO steps from the SFT checkpoint (policy = reference at the start), saved at step 5."""
    _, sft_ckpt = sft_full
    ckpt = str(tmp_path_factory.mktemp("dpo") / "ckpt")
    history = run_training(dpo_values(exported, load=sft_ckpt, finetune=True, save=ckpt, exit_interval=5))
    return history, ckpt


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP loading in this one process
def test_dpo_starts_at_log2_learns_and_equals_an_independent_computation(exported, sft_full, dpo_first):
    (_, sft_ckpt), (first, ckpt) = sft_full, dpo_first
    start = first[0]
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert (start["reward_chosen"], start["reward_rejected"], start["reward_accuracy"]) == (0.0, 0.0, 0.0)
    assert first[-1]["reward_margin"] > 0.2 and first[-1]["reward_accuracy"] >= 0.75
    assert first[-1]["loss"] < math.log(2) - 0.1
    with pytest.raises(ConfigError, match="resumes a DPO run"):
        resolved(dpo_values(exported, load=ckpt, save=ckpt))
    cfg, tokenizer = resolved(dpo_values(exported, load=ckpt, save=ckpt, ref_load=sft_ckpt))
    expected = dpo_loss_by_hand(cfg, tokenizer, ckpt, sft_ckpt, step=6)
    resumed = run_training(dpo_values(exported, load=ckpt, save=ckpt, ref_load=sft_ckpt))
    assert [r["step"] for r in resumed] == [6]
    assert resumed[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_dpo_tensor_and_data_parallel_match_one_process(exported, sft_full, dpo_first, tmp_path):
    """TP2 + SP x DP2: the reference loads its TP shards; rewards are reduced over DP."""
    (_, sft_ckpt), (single, _) = sft_full, dpo_first
    values = dpo_values(exported, load=sft_ckpt, finetune=True, exit_interval=3,
                        tensor_model_parallel_size=2, sequence_parallel=True)
    records = torchrun_job(4, values, str(tmp_path / "m.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for got, want in zip(records, single):
        for key in ("loss", "reward_margin", "reward_accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key


# ---- errors before any work ----------------------------------------------------------------------
def copy_export(exported, directory, swap=None) -> str:
    """A copy of the SFT files; swap=(field, dataset path) takes that field's .bin/.idx from elsewhere."""
    directory.mkdir()
    prefix = str(directory / "sft")
    for field in ("prompt", "response"):
        source = swap[1] if swap and swap[0] == field else f"{exported}/sft_{field}_document"
        for ext in (".bin", ".idx"):
            shutil.copy(source + ext, f"{prefix}_{field}_document{ext}")
    return prefix


def test_bad_inputs_fail_before_any_work(exported, pretrained, tmp_path):
    swapped = copy_export(exported, tmp_path / "a", ("response", f"{exported}/dpo_prompt_document"))  # no EOD
    cases = [
        (sft_values(exported, sft_data_path=[f"{exported}/nope"]), "nope_prompt_document.bin does not exist"),
        (sft_values(exported, sft_data_path=[swapped]), "does not end with the EOD id"),
        (sft_values(exported, data_path=["x"]), "--data-path belongs to pretraining"),
        (sft_values(exported, load=pretrained), "holds a --training-mode pretrain checkpoint"),
        (dpo_values(exported), "needs a frozen reference model"),
        (dpo_values(exported, ref_load=str(tmp_path / "empty")), "--ref-load .*empty: no checkpoint there"),
        (dpo_values(exported, load=pretrained, finetune=True, pipeline_model_parallel_size=2), "tensor, sequence and"),
        (tiny_run("", **{**COMMON, "sft_data_path": ["x"]}), "add --training-mode sft"),
    ]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message):
            resolved(values)


def test_mismatched_document_counts_and_foreign_tokenizer_are_refused(exported, tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    handmade_samples(str(short / "samples.jsonl"))
    lines = (short / "samples.jsonl").read_text().splitlines()[:10]
    (short / "samples.jsonl").write_text("\n".join(lines) + "\n")
    (short / "work").mkdir()
    export([str(short / "samples.jsonl")], str(short / "out"), ExportConfig(tokenizer=TOKENIZER, formats=["sft"]),
           str(short / "work"), progress=False)
    mixed = copy_export(exported, tmp_path / "mixed", ("response", str(short / "out" / "sft_response_document")))
    with pytest.raises(ConfigError, match=r"not aligned, documents per field: \{'prompt': 40, 'response': 5\}"):
        resolved(sft_values(exported, sft_data_path=[mixed]))
    foreign = copy_export(exported, tmp_path / "foreign")
    manifest = json.loads(open(f"{exported}/manifest.json").read())
    manifest["tokenizer"]["sha256"] = "0" * 64  # as if exported with another tokenizer
    (tmp_path / "foreign" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="says the data was tokenized with"):
        resolved(sft_values(exported, sft_data_path=[foreign]))


def test_dpo_with_bf16_parameters_starts_with_policy_equal_to_reference(exported, sft_full):
    """--params-dtype bfloat16 under ZeRO-1: the reference is built and rounded as the policy is, so
    the first loss is exactly log 2; the master weights take the SFT checkpoint's fp32 values and learn."""
    _, sft_ckpt = sft_full
    history = run_training(dpo_values(exported, load=sft_ckpt, finetune=True, bf16=True, use_distributed_optimizer=True,
                                      params_dtype="bfloat16"))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["loss"] < math.log(2) - 0.05
