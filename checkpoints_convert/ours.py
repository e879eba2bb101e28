"""Reading and writing our own checkpoints (torch.distributed.checkpoint directories, see
megatron_code/training/checkpointing.py) one layer at a time, in a single process.

Contract with the trainer, whatever (TP, PP, DP) layout saved the checkpoint: every "model.*"
entry of the DCP metadata carries the parameter's global name and global (unsharded) shape, so
asking DCP for one name in a plain tensor of that shape returns the full tensor, assembled from
however many shards the ranks wrote. Nothing here depends on the layout that saved it.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints_convert.errors import ConvertError
from megatron_code.model.config import ModelConfig
from megatron_code.training.checkpointing import LATEST_MARKER, checkpoint_dir
from megatron_code.training.config import from_saved

TRAIN_STATE = "train_state.json"
MODEL_PREFIX = "model."
# Non-tensor entries some layers keep next to their weights (Transformer Engine's FP8 metadata).
IGNORED_SUFFIXES = ("._extra_state",)


@contextlib.contextmanager
def _dcp_call(what: str, path: str):
    """Run one DCP call quietly (it warns on every single-process call that no process group
    exists; that is the intent) and turn its CheckpointException, a BaseException wrapping each
    rank's error, back into the ConvertError raised inside, or a ConvertError naming the path."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    except CheckpointException as exc:
        errors = [error for error, _ in exc.failures.values()]
        for error in errors:
            if isinstance(error, ConvertError):
                raise error from None
        first = errors[0] if errors else exc
        raise ConvertError(f"{what} {path} failed: {type(first).__name__}: {first}") from None


def resolve_checkpoint_dir(path: str, iteration: int | None = None) -> str:
    """A checkpoint root (uses its `latest` marker, or `iteration`) or one iter_XXXXXXX directory."""
    if not os.path.isdir(path):
        raise ConvertError(f"checkpoint {path!r}: no such directory.")
    if os.path.isfile(os.path.join(path, ".metadata")):
        if iteration is not None:
            raise ConvertError(f"--iteration is for a checkpoint root; {path} is already one iteration's directory.")
        return path
    if iteration is None:
        marker = os.path.join(path, LATEST_MARKER)
        if not os.path.isfile(marker):
            raise ConvertError(
                f"checkpoint {path!r}: neither a checkpoint root (no {LATEST_MARKER}) nor an iteration "
                "directory (no .metadata). Pass the --save directory of a run or one of its iter_XXXXXXX folders."
            )
        with open(marker) as fh:
            iteration = int(fh.read().strip())
    ckpt = checkpoint_dir(path, iteration)
    if not os.path.isfile(os.path.join(ckpt, ".metadata")):
        raise ConvertError(f"checkpoint {ckpt!r} does not exist or is incomplete (no .metadata).")
    return ckpt


class OurCheckpoint:
    """One iteration of our checkpoint: its model config and global model tensors."""

    def __init__(self, path: str, iteration: int | None = None):
        self.path = resolve_checkpoint_dir(path, iteration)
        state_file = os.path.join(self.path, TRAIN_STATE)
        if not os.path.isfile(state_file):
            raise ConvertError(f"{self.path}: no {TRAIN_STATE}, so the model's shape is unknown.")
        with open(state_file) as fh:
            self.train_state = json.load(fh)
        run_config = self.train_state.get("config") or {}
        if "model" not in run_config:
            raise ConvertError(f"{state_file}: no config.model section (the model's shape).")
        self.run_config = run_config
        self.config = from_saved(ModelConfig, run_config["model"])
        metadata = dcp.FileSystemReader(self.path).read_metadata().state_dict_metadata
        self.tensors: dict[str, tuple[tuple, torch.dtype]] = {}
        for key, md in metadata.items():
            if not key.startswith(MODEL_PREFIX) or key.endswith(IGNORED_SUFFIXES):
                continue
            if not isinstance(md, TensorStorageMetadata):
                raise ConvertError(f"{self.path}: entry {key} is not a tensor; this converter reads only tensors.")
            self.tensors[key[len(MODEL_PREFIX):]] = (tuple(md.size), md.properties.dtype)
        if not self.tensors:
            raise ConvertError(f"{self.path}: the checkpoint holds no model.* tensors.")

    @property
    def tokenizer_model(self) -> str | None:
        return (self.run_config.get("data") or {}).get("tokenizer_model")

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The full tensors of these names (without the "model." prefix), in their stored dtype."""
        state = {MODEL_PREFIX + n: torch.empty(self.tensors[n][0], dtype=self.tensors[n][1]) for n in names}
        with _dcp_call("reading checkpoint", self.path):
            dcp.load(state, checkpoint_id=self.path, no_dist=True)
        return {n: state[MODEL_PREFIX + n] for n in names}


class _StreamingSavePlanner(DefaultSavePlanner):
    """DCP plans the save from meta tensors (shape and dtype only); each tensor's data is made by
    `produce(name)` when the writer reaches it, so memory holds one layer, not the model."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self.produce = produce

    def resolve_data(self, write_item):
        fqn = write_item.index.fqn
        if not fqn.startswith(MODEL_PREFIX):
            return super().resolve_data(write_item)
        return self.produce(fqn[len(MODEL_PREFIX):])


def write_checkpoint(root: str, tensors: dict[str, tuple[tuple, torch.dtype]],
                     produce: Callable[[str], torch.Tensor], train_state: dict, iteration: int = 0) -> str:
    """Write ROOT/iter_XXXXXXX (DCP) + train_state.json and ROOT/latest marker, streaming the
    tensors through `produce`. ROOT is expected to be a fresh (temporary) directory."""
    ckpt = checkpoint_dir(root, iteration)
    os.makedirs(ckpt)
    state = {"model": {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in tensors.items()}}
    # One file per tensor: torch 2.13's FileSystemWriter keeps a reference to every tensor it
    # wrote into a file until the file is closed (for its safetensors mode), so a single file per
    # rank would hold the whole model in memory by the end.
    writer = dcp.FileSystemWriter(ckpt, single_file_per_rank=False)
    with _dcp_call("writing checkpoint", ckpt):
        dcp.save(state, storage_writer=writer, planner=_StreamingSavePlanner(produce), no_dist=True)
    with open(os.path.join(ckpt, TRAIN_STATE), "w") as fh:
        json.dump({**train_state, "iteration": iteration}, fh, indent=2)
    with open(os.path.join(root, LATEST_MARKER), "w") as fh:
        fh.write(f"{iteration}\n")
    return ckpt
