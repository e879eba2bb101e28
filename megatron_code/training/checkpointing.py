"""Checkpoints through torch.distributed.checkpoint (DCP).

Layout of --save DIR:

    DIR/iter_0000200/            DCP shards of {"model": ..., "optimizer": ...} (FQN keyed)
    DIR/iter_0000200/train_state.json   iteration, consumed samples, the run config
    DIR/iter_0000200/rng/rank_00000.pt  each rank's RNG states
    DIR/latest_checkpointed_iteration.txt   written last

A checkpoint is written under a temporary name and renamed when complete, and the `latest`
marker is replaced atomically after that, so a crash at any point leaves the previous checkpoint
as the one that loads.

Every tensor is stored under its global name with its global (unsharded) shape: a rank's
tensor-parallel shard is wrapped as a DTensor over the TP mesh, and DCP writes the shards and
de-duplicates replicas (data-parallel copies). Loading under another layout therefore just
reads other slices of the same global tensors, and a reader that asks for one name gets the
full tensor (what checkpoints_convert relies on).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

from megatron_code.parallel.state import ParallelState

LATEST_MARKER = "latest_checkpointed_iteration.txt"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _global_view(tensor: torch.Tensor, param, parallel: ParallelState):
    """This rank's piece of a global tensor, as DCP should see it."""
    if parallel.mesh is None:
        return tensor
    dim = getattr(param, "tensor_parallel_dim", None)
    placement = Replicate() if dim is None else Shard(dim)
    return DTensor.from_local(tensor, parallel.mesh["tp"], [placement], run_check=False)


def _adam_state(optimizer, param) -> dict:
    """The AdamW state of a parameter, created (zeros) if the optimizer has not stepped yet so a
    checkpoint can be loaded into it."""
    state = optimizer.state[param]
    if not state:
        fused = any(g.get("fused") for g in optimizer.param_groups)
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def sharded_state(model, optimizer, parallel: ParallelState) -> dict:
    """{"model": {name: tensor}, "optimizer": {name: {exp_avg, exp_avg_sq}}, "optimizer_step": n}
    with every tensor in its global form (see the module docstring)."""
    state = {"model": {name: _global_view(p.detach(), p, parallel) for name, p in model.named_parameters()}}
    if optimizer is not None:
        adam = {name: _adam_state(optimizer, p) for name, p in model.named_parameters()}
        state["optimizer"] = {
            name: {key: _global_view(s[key], p, parallel) for key in ("exp_avg", "exp_avg_sq")}
            for (name, p), s in zip(model.named_parameters(), adam.values())
        }
        # AdamW keeps one step count per parameter; they are always equal.
        state["optimizer_step"] = next(iter(adam.values()))["step"].detach().clone().cpu()
    return state


def _copy_loaded(state: dict, model, optimizer) -> None:
    """Copy what DCP loaded back into parameters and Adam state (a DTensor wrapper may not share
    storage with the tensor it was built from)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            loaded = state["model"][name]
            p.copy_(loaded.to_local() if isinstance(loaded, DTensor) else loaded)
            if optimizer is not None:
                adam = optimizer.state[p]
                for key in ("exp_avg", "exp_avg_sq"):
                    value = state["optimizer"][name][key]
                    adam[key].copy_(value.to_local() if isinstance(value, DTensor) else value)
                adam["step"].copy_(state["optimizer_step"])


def save_checkpoint(root: str, iteration: int, model, optimizer, parallel: ParallelState,
                    train_state: dict) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final_dir = checkpoint_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(os.path.join(tmp_dir, "rng"))
    _barrier()
    dcp.save(sharded_state(model, optimizer, parallel), checkpoint_id=tmp_dir)
    torch.save(rng_state(), os.path.join(tmp_dir, "rng", f"rank_{_rank():05d}.pt"))
    if _rank() == 0:
        with open(os.path.join(tmp_dir, "train_state.json"), "w") as fh:
            json.dump({**train_state, "iteration": iteration}, fh, indent=2, default=_json_default)
    _barrier()
    if _rank() == 0:
        _publish(tmp_dir, final_dir)
        _write_text_atomically(os.path.join(root, LATEST_MARKER), f"{iteration}\n")
    _barrier()
    return final_dir


def _publish(tmp_dir: str, final_dir: str) -> None:
    """Rename the finished temp dir into place; an existing checkpoint of the same iteration is
    moved aside first and deleted only after the new one is in place."""
    old = final_dir + ".old"
    if os.path.exists(final_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def _json_default(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return str(obj)


def latest_iteration(root: str) -> int | None:
    """Iteration named by the `latest` marker, or None when there is no complete checkpoint."""
    marker = os.path.join(root, LATEST_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker) as fh:
        return int(fh.read().strip())


def load_checkpoint(root: str, model, optimizer, parallel: ParallelState, restore_rng: bool = True) -> dict | None:
    """Load the latest checkpoint under root into model (and optimizer, unless None), whatever
    layout saved it. Returns its train state, or None when root holds no checkpoint yet (a fresh
    run with --load == --save)."""
    train_state = read_train_state(root)
    if train_state is None:
        return None
    ckpt = checkpoint_dir(root, train_state["iteration"])
    state = sharded_state(model, optimizer, parallel)
    dcp.load(state, checkpoint_id=ckpt)
    _copy_loaded(state, model, optimizer)
    if restore_rng:
        set_rng_state(torch.load(_rng_file(ckpt), weights_only=False))
    return train_state


def read_train_state(root: str) -> dict | None:
    """train_state.json of the latest checkpoint (iteration, consumed samples, run config)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    with open(os.path.join(checkpoint_dir(root, iteration), "train_state.json")) as fh:
        return json.load(fh)


def _rng_file(ckpt: str) -> str:
    """This rank's RNG file, or rank 0's when the checkpoint was saved by fewer ranks (resharded
    resume: the data order does not depend on these states, and there is no dropout)."""
    own = os.path.join(ckpt, "rng", f"rank_{_rank():05d}.pt")
    return own if os.path.exists(own) else os.path.join(ckpt, "rng", "rank_00000.pt")
