"""Logits of our GPTModel (from our checkpoint) vs transformers' model (from a Hugging Face
directory) on random token sequences, both computed in float32 on CPU.

When one side is stored in a narrower dtype than the other (an fp32 checkpoint exported with
--dtype bfloat16), the wider side's weights are rounded to the narrower dtype first, so the
comparison measures the conversion, not the rounding the user asked for. Both models are held
in memory in float32: about 8 bytes per parameter in all.
"""
from __future__ import annotations

import json
import os

import torch

from checkpoints_convert.adapters import adapter_for
from checkpoints_convert.errors import ConvertError, VerifyError
from checkpoints_convert.ours import OurCheckpoint
from checkpoints_convert.safetensors_io import HFWeights

VOCAB_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def narrowest(dtypes) -> torch.dtype:
    """The lowest-precision floating dtype (fewest mantissa bits) among dtypes."""
    floats = [d for d in dtypes if d.is_floating_point]
    return max(floats, key=lambda d: torch.finfo(d).eps) if floats else torch.float32


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float() if torch.finfo(dtype).eps > torch.finfo(t.dtype).eps else t.float()


def load_our_model(ckpt: OurCheckpoint, round_to: torch.dtype):
    """GPTModel in float32 (sdpa attention, no dropout) with the checkpoint's weights, read one
    tensor at a time. Vocabulary rows are copied up to vocab_size: a checkpoint saved with
    another TP size may carry a different number of padding rows, which never affect logits[:V]."""
    from megatron_code.model import GPTModel

    config = ckpt.config.replace(params_dtype="float32", attention_backend="sdpa",
                                 attention_dropout=0.0, hidden_dropout=0.0)
    model = GPTModel(config).eval()
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(ckpt.tensors))
    if missing:
        raise ConvertError(f"{ckpt.path}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more).")
    vocab = config.vocab_size
    with torch.no_grad():
        for name, param in params.items():
            tensor = _round(ckpt.load([name])[name], round_to)
            if name in VOCAB_TENSORS:
                param.zero_()
                param[:vocab] = tensor[:vocab]
            else:
                param.copy_(tensor)
    return model


def load_hf_model(hf_dir: str, round_to: torch.dtype):
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConvertError("--verify needs transformers: pip install 'transformers>=4.46'.") from None
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(_round(p, round_to))
    return model


def verify_logits(checkpoint: str | OurCheckpoint, hf_dir: str, atol: float = 1e-4, num_sequences: int = 2,
                  seq_length: int = 32, seed: int = 0, log=print) -> float:
    """Max |ours - transformers| over the logits of random token sequences. Raises VerifyError
    above atol (or on a non-finite difference); returns the max difference."""
    ckpt = checkpoint if isinstance(checkpoint, OurCheckpoint) else OurCheckpoint(checkpoint)
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConvertError(f"{hf_dir}: no config.json.")
    with open(config_path) as fh:
        adapter_for(json.load(fh), config_path)  # refuses architectures we do not know
    weights = HFWeights(hf_dir)
    round_to = narrowest([dt for _, dt in ckpt.tensors.values()] + [weights.dtype(n) for n in weights.names()])
    vocab = ckpt.config.vocab_size
    ours = load_our_model(ckpt, round_to)
    theirs = load_hf_model(hf_dir, round_to)
    if theirs.config.vocab_size != vocab:
        raise VerifyError(f"vocab sizes differ: ours {vocab}, transformers {theirs.config.vocab_size}.")
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (num_sequences, seq_length), generator=generator)
    with torch.no_grad():
        ours_logits = ours(tokens)[..., :vocab].float()
        hf_logits = theirs(input_ids=tokens).logits.float()
    diff = float((ours_logits - hf_logits).abs().max())
    ok = diff <= atol  # False for NaN too
    log(f"verify: max |logit difference| = {diff:.3e} over {num_sequences} x {seq_length} random tokens "
        f"(float32, weights as {str(round_to).removeprefix('torch.')}; tolerance {atol:g}): {'OK' if ok else 'FAILED'}")
    if not ok:
        raise VerifyError(f"logits differ by {diff:.3e} > tolerance {atol:g} between {ckpt.path} and {hf_dir}.")
    return diff
