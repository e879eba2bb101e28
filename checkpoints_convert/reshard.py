"""ours -> ours, offline: a checkpoint for another (TP, PP) layout.

Checkpoints already store global tensors, and DCP reshards them at load for any layout whose
padded vocabulary has the same size. What depends on the layout is that size: the embedding
and output layer (and their Adam state) have `make_vocab_size_divisible_by x TP`-padded rows.
This command re-pads those rows for the target TP (keeping the existing rows, appending zero
rows or dropping unused padding rows), copies every other tensor, the optimizer state, the RNG
states and the data position, and records the target layout, so `mcode-train --load` resumes
under it. Tensors stream one at a time.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints_convert.errors import ConvertError
from checkpoints_convert.ours import TRAIN_STATE, OurCheckpoint, _dcp_call
from checkpoints_convert.output import atomic_output_dir, check_output_free
from megatron_code.training.checkpointing import LATEST_MARKER, checkpoint_dir

VOCAB_PARAMETERS = ("embedding.word_embeddings.weight", "output_layer.weight")


class _ProduceEveryTensor(DefaultSavePlanner):
    """Plans from meta tensors; each tensor's data is made when the writer reaches it."""

    def __init__(self, produce):
        super().__init__()
        self.produce = produce

    def resolve_data(self, write_item):
        return self.produce(write_item.index.fqn)


def _is_vocab_entry(key: str) -> bool:
    """model.<vocab param> or optimizer.<vocab param>.exp_avg(_sq)."""
    return any(f".{name}" in f".{key}" for name in VOCAB_PARAMETERS)


def check_target_layout(config, tp: int, pp: int) -> None:
    if tp < 1 or pp < 1:
        raise ConvertError(f"target layout must be positive, got TP {tp}, PP {pp}.")
    if config.num_attention_heads % tp or config.num_kv_heads % tp:
        raise ConvertError(
            f"--tensor-model-parallel-size {tp} must divide the attention heads ({config.num_attention_heads}) "
            f"and KV heads ({config.num_kv_heads}).")
    if config.num_layers % pp:
        raise ConvertError(f"--pipeline-model-parallel-size {pp} must divide the layers ({config.num_layers}).")


def reshard(source: str, out_dir: str, *, tensor_model_parallel_size: int, pipeline_model_parallel_size: int = 1,
            iteration: int | None = None, overwrite: bool = False, log=print) -> dict:
    ckpt = OurCheckpoint(source, iteration)
    tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
    check_target_layout(ckpt.config, tp, pp)
    check_output_free(out_dir, overwrite, (source,))
    metadata = dcp.FileSystemReader(ckpt.path).read_metadata().state_dict_metadata
    entries = {k: (tuple(md.size), md.properties.dtype) for k, md in metadata.items()
               if isinstance(md, TensorStorageMetadata)}
    new_rows = ckpt.config.padded_vocab_size(tp)
    target = {k: ((new_rows, *shape[1:]) if _is_vocab_entry(k) else shape, dtype) for k, (shape, dtype) in entries.items()}

    def produce(key: str) -> torch.Tensor:
        shape, dtype = entries[key]
        tensor = torch.empty(shape, dtype=dtype)
        with _dcp_call("reading checkpoint", ckpt.path):
            dcp.load({key: tensor}, checkpoint_id=ckpt.path, no_dist=True)
        if not _is_vocab_entry(key) or shape[0] == new_rows:
            return tensor
        out = torch.zeros(target[key][0], dtype=dtype)
        keep = min(shape[0], new_rows)
        out[:keep] = tensor[:keep]
        return out

    it = ckpt.train_state["iteration"]
    with atomic_output_dir(out_dir, overwrite, (source,)) as tmp:
        dest = checkpoint_dir(tmp, it)
        os.makedirs(dest)
        state = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in target.items()}
        writer = dcp.FileSystemWriter(dest, single_file_per_rank=False)
        with _dcp_call("writing checkpoint", dest):
            dcp.save(state, storage_writer=writer, planner=_ProduceEveryTensor(produce), no_dist=True)
        _copy_train_state(ckpt, dest, tp, pp)
        with open(os.path.join(tmp, LATEST_MARKER), "w") as fh:
            fh.write(f"{it}\n")
    log(f"reshard: {ckpt.path} -> {out_dir} for TP {tp} x PP {pp} (vocab rows {new_rows}); "
        f"resume with mcode-train --load {out_dir} --tensor-model-parallel-size {tp} "
        f"--pipeline-model-parallel-size {pp} ...")
    return {"output": os.path.abspath(out_dir), "iteration": it, "vocab_rows": new_rows}


def _copy_train_state(ckpt: OurCheckpoint, dest: str, tp: int, pp: int) -> None:
    state = json.loads(json.dumps(ckpt.train_state))
    parallel = state.setdefault("config", {}).setdefault("parallel", {})
    parallel.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    with open(os.path.join(dest, TRAIN_STATE), "w") as fh:
        json.dump(state, fh, indent=2)
    rng = os.path.join(ckpt.path, "rng")
    if os.path.isdir(rng):
        shutil.copytree(rng, os.path.join(dest, "rng"))
