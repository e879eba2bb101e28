"""A Hugging Face directory (LlamaForCausalLM, Qwen2ForCausalLM) -> our checkpoint, streamed.

Written (OUT is what `mcode-train --load OUT --finetune` takes):

    OUT/iter_0000000/            DCP shards of {"model": ...}: global names and shapes, HF dtype kept
    OUT/iter_0000000/train_state.json   iteration 0, the run config built from config.json
    OUT/latest_checkpointed_iteration.txt
    OUT/mcode_train_config.yaml  the model flags, for `mcode-train --config`
    OUT/tokenizer.model          the HF directory's sentencepiece model, when it has one

There is no optimizer state: continue with `--finetune` (weights only, fresh optimizer, step 0).
The layout is TP1/PP1 in the sense of vocabulary padding (rows rounded up to a multiple of 128);
the tensors are global, so any layout whose padding agrees loads them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import torch
import yaml
from tqdm import tqdm

from checkpoints_convert.adapters import adapter_for
from checkpoints_convert.errors import ConvertError
from checkpoints_convert.ours import OurCheckpoint, write_checkpoint
from checkpoints_convert.output import atomic_output_dir, check_disk_space, check_output_free
from checkpoints_convert.reshard import check_target_layout
from checkpoints_convert.safetensors_io import HFWeights, nbytes
from checkpoints_convert.to_hf import DTYPES
from checkpoints_convert.verify import verify_logits

TRAIN_CONFIG_YAML = "mcode_train_config.yaml"


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"Hugging Face directory {hf_dir!r} does not exist.")
    if not os.path.isfile(path):
        raise ConvertError(f"{hf_dir}: no config.json; pass a Hugging Face model directory.")
    with open(path) as fh:
        return json.load(fh)


def check_hf_tensors(weights: HFWeights, rules, adapter, config) -> None:
    """Every tensor the config implies is present with its shape; biases we have no place for
    are zero; nothing else is there."""
    for rule in rules:
        for name, shape in rule.hf.items():
            if name not in weights:
                raise ConvertError(f"{weights.hf_dir}: tensor {name} is missing (config.json implies it).")
            if tuple(weights.shape(name)) != tuple(shape):
                raise ConvertError(
                    f"{weights.hf_dir}: {name} has shape {list(weights.shape(name))} but config.json "
                    f"({rule.hint}) implies {list(shape)}; the config and the weights disagree."
                )
    zero = adapter.zero_tensors(config)
    for name, shape in zero.items():
        if name not in weights:
            continue
        if tuple(weights.shape(name)) != tuple(shape):
            raise ConvertError(f"{weights.hf_dir}: {name} has shape {list(weights.shape(name))}, expected {list(shape)}.")
        max_abs = float(weights.get(name).float().abs().max()) if nbytes(shape, weights.dtype(name)) else 0.0
        if max_abs != 0.0:
            raise ConvertError(adapter.nonzero_message(name, max_abs))
    known = {n for r in rules for n in r.hf} | set(zero)
    extra = sorted(n for n in weights.names() if n not in known and not adapter.ignorable(n, config))
    if extra:
        raise ConvertError(
            f"{weights.hf_dir}: unexpected tensor {extra[0]} ({len(extra)} in all) for {adapter.architecture}; "
            "our model has no place for it, so converting would drop it."
        )


def check_hf_tokenizer(hf_dir: str, vocab_size: int) -> str | None:
    """The sentencepiece model to copy (or None); refuses tokenizers larger than the embedding."""
    sp_path = os.path.join(hf_dir, "tokenizer.model")
    if os.path.isfile(sp_path):
        import sentencepiece as spm

        pieces = spm.SentencePieceProcessor(model_file=sp_path).get_piece_size()
        if pieces > vocab_size:
            raise ConvertError(f"{sp_path} has {pieces} pieces but the embedding has vocab_size={vocab_size} rows.")
    tok_json = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(tok_json):
        with open(tok_json) as fh:
            tok = json.load(fh)
        vocab = (tok.get("model") or {}).get("vocab")
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab or [])))
        ids |= {t["id"] for t in tok.get("added_tokens", [])}
        if ids and max(ids) >= vocab_size:
            raise ConvertError(f"{tok_json} uses token id {max(ids)} but the embedding has vocab_size={vocab_size} rows.")
    return sp_path if os.path.isfile(sp_path) else None


def from_hf(hf_dir: str, out_dir: str, *, dtype: str | None = None, tensor_model_parallel_size: int = 1,
            pipeline_model_parallel_size: int = 1, overwrite: bool = False, verify: bool = False,
            atol: float = 1e-4, progress: bool = True, log=print) -> dict:
    start = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    hf_config = read_hf_config(hf_dir)
    adapter = adapter_for(hf_config, os.path.join(hf_dir, "config.json"))
    config = adapter.model_config(hf_config)
    # Tensors are stored in global form, so any layout loads them; only the vocabulary padding
    # (a multiple of 128 x TP) depends on the target.
    check_target_layout(config, tensor_model_parallel_size, pipeline_model_parallel_size)
    check_output_free(out_dir, overwrite, (hf_dir,))
    sp_model = check_hf_tokenizer(hf_dir, config.vocab_size)
    weights = HFWeights(hf_dir)
    rules = adapter.rules(config, config.padded_vocab_size(tensor_model_parallel_size))
    check_hf_tensors(weights, rules, adapter, config)

    def source_dtype(rule) -> torch.dtype:
        result = None
        for name in rule.hf:
            dt = weights.dtype(name)
            result = dt if result is None else torch.promote_types(result, dt)
        return result

    plan = {r.ours: (r.ours_shape, DTYPES[dtype] if dtype else source_dtype(r)) for r in rules}
    by_name = {r.ours: r for r in rules}
    total = sum(nbytes(shape, dt) for shape, dt in plan.values())
    final = os.path.abspath(out_dir)
    with atomic_output_dir(out_dir, overwrite, (hf_dir,)) as tmp:
        check_disk_space(tmp, total)
        tokenizer_path = None
        if sp_model:
            shutil.copyfile(sp_model, os.path.join(tmp, "tokenizer.model"))
            tokenizer_path = os.path.join(final, "tokenizer.model")
        run_config = _run_config(config, tokenizer_path)
        run_config["parallel"].update(tensor_model_parallel_size=tensor_model_parallel_size,
                                      pipeline_model_parallel_size=pipeline_model_parallel_size)
        train_state = {"consumed_samples": 0, "config": run_config,
                       "converted_from": {"format": "huggingface", "path": os.path.abspath(hf_dir),
                                          "architecture": adapter.architecture}}
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="from-hf", disable=not progress)

        def produce(name: str) -> torch.Tensor:
            rule = by_name[name]
            tensor = rule.from_hf({n: weights.get(n) for n in rule.hf}).to(plan[name][1]).contiguous()
            bar.update(nbytes(tensor.shape, tensor.dtype))
            return tensor

        try:
            write_checkpoint(tmp, plan, produce, train_state, iteration=0)
        finally:
            bar.close()
        write_time = time.perf_counter() - start
        with open(os.path.join(tmp, TRAIN_CONFIG_YAML), "w") as fh:
            fh.write("# Model flags of the converted checkpoint: mcode-train --config THIS_FILE --load DIR --finetune ...\n")
            yaml.safe_dump({"model": run_config["model"], **({"data": {"tokenizer_model": tokenizer_path}}
                                                             if tokenizer_path else {})}, fh, sort_keys=False)
        if verify:
            verify_logits(OurCheckpoint(tmp), hf_dir, atol=atol, log=log)
    seconds = time.perf_counter() - start
    if not sp_model:
        log(f"from-hf: note: {hf_dir} has no sentencepiece tokenizer.model; pass --tokenizer-model to mcode-train "
            "with a sentencepiece model of the same vocabulary (the data tools read sentencepiece only).")
    log(f"from-hf: wrote {len(plan)} tensors ({total / 1e9:.3f} GB) to {out_dir} in {seconds:.1f} s "
        f"({total / 1e9 / max(write_time, 1e-9):.2f} GB/s); continue training with "
        f"mcode-train --config {os.path.join(out_dir, TRAIN_CONFIG_YAML)} --load {out_dir} --finetune ...")
    return {"output": final, "bytes": total, "seconds": seconds, "write_seconds": write_time,
            "architecture": adapter.architecture}


def _run_config(config, tokenizer_path: str | None) -> dict:
    """The full run config as the trainer writes it (current RunConfig defaults + this model)."""
    from megatron_code.training.config import RunConfig

    run = dataclasses.asdict(RunConfig(model=config))
    run["data"]["tokenizer_model"] = tokenizer_path
    return run
