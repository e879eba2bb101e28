"""checkpoints_convert, checked against transformers itself (CPU, fp32).

Our logits are computed here without the converter: GPTModel + dcp.load of the checkpoint; the
Hugging Face side is AutoModelForCausalLM / AutoTokenizer on the written directory.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from checkpoints_convert import ConvertError, VerifyError, from_hf, to_hf, verify_logits  # noqa: E402
from checkpoints_convert.__main__ import main  # noqa: E402
from megatron_code.errors import ConfigError  # noqa: E402
from megatron_code.model import GPTModel, ModelConfig  # noqa: E402
from megatron_code.tokenizer import SentencePieceTokenizer  # noqa: E402
from tests.conftest import CORPUS, TOKENIZER, run_training, tiny_run  # noqa: E402

SMALL = dict(micro_batch_size=2, global_batch_size=2, seq_length=64, lr_warmup_iters=0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- helpers ---------------------------------------------------------------------------------
def iteration_dir(root: str) -> str:
    with open(os.path.join(root, "latest_checkpointed_iteration.txt")) as fh:
        return os.path.join(root, f"iter_{int(fh.read()):07d}")


def our_model(root: str) -> GPTModel:
    """GPTModel with the checkpoint's weights, loaded by DCP directly (not by the converter)."""
    ckpt = iteration_dir(root)
    with open(os.path.join(ckpt, "train_state.json")) as fh:
        values = json.load(fh)["config"]["model"]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = GPTModel(ModelConfig(**{k: v for k, v in values.items() if k in known})).eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": params}, checkpoint_id=ckpt, no_dist=True)  # in place, casting the stored dtype
    return model


def hf_model(hf_dir: str):
    return transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def assert_same_logits(root: str, hf_dir: str, vocab: int, seq_lengths=(48, 96), atol=1e-5) -> None:
    ours, theirs = our_model(root), hf_model(hf_dir)
    generator = torch.Generator().manual_seed(0)
    for s in seq_lengths:
        tokens = torch.randint(0, vocab, (3, s), generator=generator)
        with torch.no_grad():
            a = ours(tokens)[..., :vocab]
            b = theirs(input_ids=tokens).logits
        assert a.shape == b.shape
        assert a.abs().max() > 0.5  # logits large enough for a wrong RoPE or head order to show
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def all_hf_tensors(hf_dir: str) -> dict:
    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(hf_dir, f)))
    return out


def random_llama(path, dtype=torch.float32, shard="5GB", **overrides):
    """A random-init transformers Llama saved as safetensors (no download)."""
    values = dict(vocab_size=1000, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
                  rope_theta=500000.0, rms_norm_eps=1e-5, initializer_range=0.05, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    values.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values)).to(dtype)
    model.save_pretrained(str(path), max_shard_size=shard)
    return str(path)


def nothing_left(out) -> bool:
    parent, name = os.path.split(str(out))
    return not os.path.exists(str(out)) and not [f for f in os.listdir(parent) if f.startswith(name + ".")]


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(fixture_data, tmp_path_factory) -> str:
    """The tiny preset trained 3 steps by the real trainer (fp32, untied, GQA 4/2)."""
    root = tmp_path_factory.mktemp("trained") / "ckpt"
    run_training(tiny_run(fixture_data, train_iters=3, save=str(root), **SMALL))
    return str(root)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("hf") / "model"
    to_hf(trained, str(out), max_shard_size="3MB", progress=False)
    return str(out)


# ---- ours -> HF ------------------------------------------------------------------------------
def test_to_hf_writes_a_transformers_model_with_our_logits(trained, exported):
    files = set(os.listdir(exported))
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"} <= files
    with open(os.path.join(exported, "model.safetensors.index.json")) as fh:
        assert set(json.load(fh)["weight_map"].values()) == set(shards)
    config = transformers.AutoConfig.from_pretrained(exported)
    assert config.architectures == ["LlamaForCausalLM"] and config.vocab_size == 2048
    assert config.num_key_value_heads == 2 and not config.tie_word_embeddings
    assert all(t.dtype == torch.float32 for t in all_hf_tensors(exported).values())  # dtype kept
    assert_same_logits(trained, exported, vocab=2048)


def test_tokenizer_ids_equal_ours(exported):
    ours = SentencePieceTokenizer(TOKENIZER)
    theirs = transformers.AutoTokenizer.from_pretrained(exported)
    with open(CORPUS) as fh:
        samples = [json.loads(line)["text"] for line in fh][:40]
    samples += [
        "def f(x):\n\tif x:\n\t\treturn x\t# tab\n",
        "    " * 20 + "deep()\n" + " " * 73 + "\n\n\n\t \t \n",
        "s = 'héllo wörld ✓ 日本語 😀 \u00a0\u200b\u3000 ﬁ ＡＢＣ e\u0301'\r\n",
        "<p><s>struck</s></p> <|im_start|> <pad> <unk> 0123456789",
        "", " ", "\n", "trailing   ",
    ]
    for text in samples:
        ids = ours.encode(text)
        assert theirs.encode(text, add_special_tokens=False) == ids, text[:60]
        assert theirs(text)["input_ids"] == ids  # no BOS/EOS added: our data has none before text
        assert theirs.decode(ids) == text
    # The one documented difference: a literal U+2581 is byte-encoded by ours, the space piece by HF.
    text = "x = '\u2581'"
    assert theirs.encode(text, add_special_tokens=False) != ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (ours.bos, ours.eod, ours.pad)


# ---- HF -> ours ------------------------------------------------------------------------------
def test_hf_llama_to_ours_gives_transformers_logits(tmp_path):
    hf_dir = random_llama(tmp_path / "hf")  # GQA, head_dim 32 != 96/4, llama3 RoPE, vocab 1000 (padded 1024)
    from_hf(hf_dir, str(tmp_path / "ours"), progress=False)
    assert_same_logits(str(tmp_path / "ours"), hf_dir, vocab=1000, seq_lengths=(64, 200))


def test_hf_to_ours_to_hf_is_bit_exact(tmp_path):
    hf_dir = random_llama(tmp_path / "hf", dtype=torch.bfloat16, shard="150KB", tie_word_embeddings=True)
    from_hf(hf_dir, str(tmp_path / "ours"), progress=False)
    ckpt = iteration_dir(str(tmp_path / "ours"))
    meta = dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert meta["model.embedding.word_embeddings.weight"].size == torch.Size([1024, 96])  # padded to 128
    assert {m.properties.dtype for m in meta.values()} == {torch.bfloat16}  # dtype kept
    assert "model.output_layer.weight" not in meta  # tied
    to_hf(str(tmp_path / "ours"), str(tmp_path / "back"), no_tokenizer=True, max_shard_size="150KB", progress=False)
    before, after = all_hf_tensors(hf_dir), all_hf_tensors(str(tmp_path / "back"))
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


def test_qwen2_zero_biases_convert_nonzero_biases_are_refused(tmp_path):
    config = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters() if n.endswith("bias"))
    model.save_pretrained(str(tmp_path / "zero"))
    from_hf(str(tmp_path / "zero"), str(tmp_path / "ours"), progress=False)
    assert_same_logits(str(tmp_path / "ours"), str(tmp_path / "zero"), vocab=512)

    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.bias.fill_(0.25)
    model.save_pretrained(str(tmp_path / "biased"))
    with pytest.raises(ConvertError, match=r"non-zero attention biases \(model.layers.1.self_attn.k_proj.bias.*"
                                           r"not supported"):
        from_hf(str(tmp_path / "biased"), str(tmp_path / "ours2"), progress=False)
    assert nothing_left(tmp_path / "ours2")


def test_training_continues_from_a_converted_checkpoint(trained, exported, fixture_data, tmp_path):
    """ours -> HF -> ours, then --load --finetune: the same losses as fine-tuning the original."""
    from_hf(exported, str(tmp_path / "ours"), progress=False)
    run = dict(train_iters=2, finetune=True, **SMALL)
    converted = run_training(tiny_run(fixture_data, load=str(tmp_path / "ours"), **run))
    original = run_training(tiny_run(fixture_data, load=trained, **run))
    assert [r["loss"] for r in converted] == [r["loss"] for r in original]
    assert [r["grad_norm"] for r in converted] == [r["grad_norm"] for r in original]
    without_finetune = dict(run, finetune=False)
    with pytest.raises(ConfigError, match="holds weights only .* add --finetune"):
        run_training(tiny_run(fixture_data, load=str(tmp_path / "ours"), **without_finetune))


# ---- --verify and verify ---------------------------------------------------------------------
def test_verify_command_and_flag(trained, exported, tmp_path, capsys):
    assert main(["verify", trained, exported]) == 0
    assert "max |logit difference|" in capsys.readouterr().out
    assert main(["to-hf", trained, str(tmp_path / "v"), "--verify", "--atol", "1e-5", "--quiet"]) == 0
    assert ": OK" in capsys.readouterr().out

    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    for f in os.listdir(broken):
        if f.endswith(".safetensors"):
            tensors = load_file(str(broken / f))
            if "lm_head.weight" in tensors:
                tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1.01
                save_file(tensors, str(broken / f), metadata={"format": "pt"})
    assert main(["verify", trained, str(broken)]) == 1
    assert "verify failed: logits differ" in capsys.readouterr().err
    with pytest.raises(VerifyError):
        verify_logits(trained, str(broken), log=lambda *_: None)


# ---- bad input -------------------------------------------------------------------------------
def _edit_json(path, **changes):
    with open(path) as fh:
        value = json.load(fh)
    value.update(changes)
    with open(path, "w") as fh:
        json.dump(value, fh)


def test_bad_inputs_are_refused_clearly(trained, exported, tmp_path, capsys):
    def refused(argv, message):
        capsys.readouterr()
        assert main(argv + ["--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mcode-convert: error: ") and message in err, err
        assert nothing_left(argv[2])

    hf = random_llama(tmp_path / "hf", shard="150KB")
    capsys.readouterr()
    bad = tmp_path / "unknown"
    shutil.copytree(hf, bad)
    _edit_json(bad / "config.json", architectures=["MistralForCausalLM"])
    refused(["from-hf", str(bad), str(tmp_path / "o1")], "unknown architecture 'MistralForCausalLM'")

    shards = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))
    assert len(shards) > 2
    bad = tmp_path / "missing"
    shutil.copytree(hf, bad)
    os.remove(bad / shards[1])
    refused(["from-hf", str(bad), str(tmp_path / "o2")], f"shards listed in model.safetensors.index.json are missing: {shards[1]}")

    bad = tmp_path / "heads"
    shutil.copytree(hf, bad)
    _edit_json(bad / "config.json", num_key_value_heads=1)
    refused(["from-hf", str(bad), str(tmp_path / "o3")], "k_proj.weight has shape [64, 96] but config.json")

    bad = tmp_path / "vocab_hf"  # tokenizer with 2048 pieces, config says 2000 rows
    shutil.copytree(exported, bad)
    _edit_json(bad / "config.json", vocab_size=2000)
    refused(["from-hf", str(bad), str(tmp_path / "o4")], "has 2048 pieces but the embedding has vocab_size=2000")

    bad = tmp_path / "vocab_ours"  # the checkpoint's model config says 2000 tokens; the tokenizer has 2048
    shutil.copytree(trained, bad)
    state_file = os.path.join(iteration_dir(str(bad)), "train_state.json")
    with open(state_file) as fh:
        state = json.load(fh)
    state["config"]["model"]["vocab_size"] = 2000
    with open(state_file, "w") as fh:
        json.dump(state, fh)
    refused(["to-hf", str(bad), str(tmp_path / "o5")], "has 2048 pieces but the model was trained with vocab_size=2000")

    refused(["from-hf", hf, str(tmp_path / "o6"), "--tensor-model-parallel-size", "3"], "must divide the attention heads")

    bad = tmp_path / "truncated"  # fails half-way through writing: nothing may be left behind
    shutil.copytree(hf, bad)
    last = bad / shards[-1]
    os.truncate(last, os.path.getsize(last) - 100)
    refused(["from-hf", str(bad), str(tmp_path / "o7")], "truncated file")

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    assert main(["from-hf", hf, str(occupied), "--quiet"]) == 2
    assert "not empty; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(occupied) == ["keep.txt"]
    assert main(["from-hf", hf, str(occupied), "--overwrite", "--quiet"]) == 0
    assert "keep.txt" not in os.listdir(occupied)


# ---- other layouts ---------------------------------------------------------------------------
def test_tp2_pp2_loads_a_converted_model_and_its_checkpoint_converts_back(fixture_data, tmp_path):
    """transformers model (random init) -> ours; fine-tuned under TP2 x PP2 with the same losses as
    in one process; the checkpoint that layout saved -> HF gives transformers logits equal to ours."""
    layout, procs = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 4
    tiny_shape = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                      rope_theta=10000.0, rope_scaling=None, initializer_range=0.05)
    hf_dir = random_llama(tmp_path / "hf", **tiny_shape)
    converted, save = str(tmp_path / "converted"), tmp_path / "ckpt"
    from_hf(hf_dir, converted, progress=False)
    assert_same_logits(converted, hf_dir, vocab=2048, seq_lengths=(64,))  # ours (one process) == transformers
    run = dict(train_iters=2, micro_batch_size=1, global_batch_size=2, seq_length=64, lr_warmup_iters=0)
    single = [r["loss"] for r in run_training(tiny_run(fixture_data, load=converted, finetune=True, **run))]

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "megatron_code.train", "--preset", "tiny", *layout, "--data-path", fixture_data,
           "--tokenizer-model", TOKENIZER, "--load", converted, "--finetune", "--save", str(save),
           "--metrics-file", str(tmp_path / "metrics.jsonl"), "--eval-interval", "0", "--num-workers", "0",
           "--seed", "1234", *[f"--{k.replace('_', '-')}={v}" for k, v in run.items()]]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    # Judge by what the run wrote (gloo can abort at interpreter exit after the work succeeded).
    assert (save / "latest_checkpointed_iteration.txt").is_file(), result.stdout[-2000:] + result.stderr[-4000:]
    with open(tmp_path / "metrics.jsonl") as fh:
        multi = [r["loss"] for r in map(json.loads, fh) if "loss" in r]
    assert len(multi) == len(single) == 2 and multi == pytest.approx(single, rel=1e-5)

    to_hf(str(save), str(tmp_path / "back"), progress=False)
    assert_same_logits(str(save), str(tmp_path / "back"), vocab=2048)


# ---- ours -> ours for another layout -----------------------------------------------------------

def test_reshard_repads_the_vocabulary_for_another_tensor_parallel_size(fixture_data, tmp_path):
    """--make-vocab-size-divisible-by 1000 pads 2048 tokens to 3000 rows at TP1 but 4000 at TP2:
    resuming under TP2 is refused with the fix named; `reshard` re-pads (model and Adam state) and
    the TP2 run resumes at the right step with the uninterrupted run's loss (padded ids are
    masked out of the softmax, so the amount of padding does not matter)."""
    from checkpoints_convert.reshard import reshard
    from megatron_code.training.checkpointing import checkpoint_dir
    from tests.test_parallel import cli_args

    run = dict(micro_batch_size=2, global_batch_size=4, seq_length=64, make_vocab_size_divisible_by=1000,
               lr_warmup_iters=1, train_iters=3)
    full = run_training(tiny_run(fixture_data, **run))
    ckpt, resharded = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    run_training(tiny_run(fixture_data, **run, save=ckpt, exit_interval=2))

    def tp2(load):
        values = tiny_run(fixture_data, **run, load=load, tensor_model_parallel_size=2,
                          metrics_file=str(tmp_path / f"{os.path.basename(load)}.jsonl"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "megatron_code.train", *cli_args(values)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    refused = tp2(ckpt)
    assert refused.returncode != 0 and "embedding has 3000 rows" in refused.stderr
    reshard(ckpt, resharded, tensor_model_parallel_size=2)
    shapes = dcp.FileSystemReader(checkpoint_dir(resharded, 2)).read_metadata().state_dict_metadata
    assert tuple(shapes["model.embedding.word_embeddings.weight"].size) == (4000, 256)
    assert tuple(shapes["optimizer.output_layer.weight.exp_avg"].size) == (4000, 256)
    resumed = tp2(resharded)
    records = [json.loads(line) for line in open(tmp_path / "tp2.jsonl") if '"loss"' in line]
    assert [r["step"] for r in records] == [3], resumed.stderr[-2000:]
    assert records[0]["loss"] == pytest.approx(full[2]["loss"], rel=1e-5)


def test_from_hf_pads_the_vocabulary_for_the_target_tensor_parallel_size(tmp_path):
    hf_dir = str(tmp_path / "hf")
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    from_hf(hf_dir, str(tmp_path / "ours"), tensor_model_parallel_size=4, progress=False)
    meta = dcp.FileSystemReader(str(tmp_path / "ours" / "iter_0000000")).read_metadata().state_dict_metadata
    assert tuple(meta["model.embedding.word_embeddings.weight"].size) == (1024, 64)  # multiple of 128 x 4 = 512
    with pytest.raises(ConvertError, match="must divide the attention heads"):
        from_hf(hf_dir, str(tmp_path / "bad"), tensor_model_parallel_size=8, progress=False)


def test_hf_model_converted_to_ours_gives_transformers_logits_under_tp2(tmp_path):
    """A random-init transformers Llama -> ours, loaded by two tensor-parallel ranks: the gathered
    logits equal transformers' (fp32)."""
    hf_dir = random_llama(tmp_path / "hf", num_attention_heads=4, num_key_value_heads=2)
    from_hf(hf_dir, str(tmp_path / "ours"), tensor_model_parallel_size=2, progress=False)
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_logits_worker.py")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", worker,
         str(tmp_path / "ours"), str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (tmp_path / "logits.pt").exists(), result.stderr[-3000:]
    ours = torch.load(tmp_path / "logits.pt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
