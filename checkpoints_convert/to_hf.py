"""Our checkpoint -> a Hugging Face LlamaForCausalLM directory, one tensor at a time.

Written: config.json, generation_config.json, model.safetensors (or model-0000x-of-0000y
shards + model.safetensors.index.json), tokenizer.json / tokenizer_config.json /
special_tokens_map.json / tokenizer.model. Memory: one of our tensors plus its HF pieces (the
shard files are streamed, see safetensors_io), whatever the layout that saved the checkpoint.
"""
from __future__ import annotations

import json
import os
import time

import torch
from tqdm import tqdm

from checkpoints_convert.adapters import ADAPTERS, Rule
from checkpoints_convert.errors import ConvertError
from checkpoints_convert.hf_tokenizer import special_ids, write_tokenizer
from checkpoints_convert.ours import OurCheckpoint
from checkpoints_convert.output import atomic_output_dir, check_disk_space, check_output_free
from checkpoints_convert.safetensors_io import ShardedWriter, nbytes, parse_size
from checkpoints_convert.verify import verify_logits

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_our_tensors(ckpt: OurCheckpoint, rules: list[Rule]) -> None:
    """The checkpoint holds exactly the tensors the config implies, with those shapes."""
    expected = {r.ours: r for r in rules}
    for name, rule in expected.items():
        if name not in ckpt.tensors:
            raise ConvertError(f"{ckpt.path}: tensor model.{name} is missing (the config in train_state.json "
                               "implies it); the checkpoint is incomplete or of another model.")
        shape = ckpt.tensors[name][0]
        if tuple(shape) != tuple(rule.ours_shape):
            raise ConvertError(
                f"{ckpt.path}: model.{name} has shape {list(shape)} but train_state.json's model config "
                f"({rule.hint}) implies {list(rule.ours_shape)}."
            )
    extra = sorted(set(ckpt.tensors) - set(expected))
    if extra:
        raise ConvertError(f"{ckpt.path}: unknown tensor model.{extra[0]} ({len(extra)} in all); this converter "
                           "knows the layout of docs/model.md only.")


def resolve_tokenizer(ckpt: OurCheckpoint, tokenizer_model: str | None) -> str:
    path = tokenizer_model or ckpt.tokenizer_model
    if not path:
        raise ConvertError(f"{ckpt.path}: train_state.json records no tokenizer; pass --tokenizer-model, or "
                           "--no-tokenizer to write the weights and config only.")
    if not os.path.isfile(path):
        where = "--tokenizer-model" if tokenizer_model else "the tokenizer recorded in train_state.json"
        raise ConvertError(f"{where}: no file at {path!r}; pass --tokenizer-model with the run's sentencepiece .model.")
    from megatron_code.tokenizer import SentencePieceTokenizer

    pieces = SentencePieceTokenizer(path).vocab_size
    vocab = ckpt.config.vocab_size
    if pieces != vocab:
        raise ConvertError(
            f"tokenizer {path} has {pieces} pieces but the model was trained with vocab_size={vocab} "
            f"(embedding rows in use); this is not the run's tokenizer. Pass --tokenizer-model with the .model "
            "file the data was tokenized with."
        )
    return path


def to_hf(checkpoint: str, out_dir: str, *, iteration: int | None = None, tokenizer_model: str | None = None,
          no_tokenizer: bool = False, dtype: str | None = None, max_shard_size: str | int = "5GB", overwrite: bool = False,
          verify: bool = False, atol: float = 1e-4, progress: bool = True, log=print) -> dict:
    """Convert; returns a summary (files, bytes, seconds)."""
    start = time.perf_counter()
    ckpt = OurCheckpoint(checkpoint, iteration)
    config = ckpt.config
    check_output_free(out_dir, overwrite, (ckpt.path,))
    if config.vocab_size is None:
        raise ConvertError(f"{ckpt.path}: train_state.json has no model.vocab_size.")
    embedding = ckpt.tensors.get("embedding.word_embeddings.weight")
    if embedding is None:
        raise ConvertError(f"{ckpt.path}: tensor model.embedding.word_embeddings.weight is missing.")
    padded = embedding[0][0]
    if padded < config.vocab_size:
        raise ConvertError(f"{ckpt.path}: the embedding has {padded} rows, fewer than vocab_size={config.vocab_size}.")
    adapter = ADAPTERS["LlamaForCausalLM"]
    rules = adapter.rules(config, padded)
    check_our_tensors(ckpt, rules)
    tokenizer = None if no_tokenizer else resolve_tokenizer(ckpt, tokenizer_model)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    out_dtype = {r.ours: DTYPES[dtype] if dtype else ckpt.tensors[r.ours][1] for r in rules}
    entries = [(name, out_dtype[r.ours], shape) for r in rules for name, shape in r.hf.items()]
    max_shard_bytes = parse_size(max_shard_size)
    with atomic_output_dir(out_dir, overwrite, (ckpt.path,)) as tmp:
        writer = ShardedWriter(tmp, entries, max_shard_bytes)
        check_disk_space(tmp, writer.total_size)
        if tokenizer:  # first: its self-check can refuse the export before any weights are written
            write_tokenizer(tokenizer, tmp, config.max_position_embeddings)
        bar = tqdm(total=writer.total_size, unit="B", unit_scale=True, desc="to-hf", disable=not progress)
        try:
            for rule in rules:
                tensor = ckpt.load([rule.ours])[rule.ours]
                for name, piece in rule.to_hf(tensor).items():
                    piece = piece.to(out_dtype[rule.ours])
                    writer.write(name, piece)
                    bar.update(nbytes(piece.shape, piece.dtype))
                del tensor
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        write_time = time.perf_counter() - start
        ids = special_ids(tokenizer) if tokenizer else {}
        hf_config = adapter.hf_config(config, out_dtype[rules[0].ours], ids)
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        _write_json(os.path.join(tmp, "generation_config.json"), {**ids, "_from_model_config": True})
        if verify:
            verify_logits(ckpt, tmp, atol=atol, log=log)
    seconds = time.perf_counter() - start
    summary = {"output": os.path.abspath(out_dir), "source": ckpt.path, "shards": writer.names,
               "bytes": writer.total_size, "largest_shard_bytes": writer.largest_shard_bytes,
               "seconds": seconds, "write_seconds": write_time}
    log(f"to-hf: wrote {len(entries)} tensors ({writer.total_size / 1e9:.3f} GB) in {len(writer.names)} "
        f"file(s) to {out_dir} in {seconds:.1f} s ({writer.total_size / 1e9 / max(write_time, 1e-9):.2f} GB/s)")
    return summary


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as fh:
        json.dump(value, fh, indent=2)
        fh.write("\n")
