"""Checkpoints through torch.distributed.checkpoint (DCP).

Layout of --save DIR:

    DIR/iter_0000200/            DCP shards of {"model": ..., "optimizer": ...} (FQN keyed)
    DIR/iter_0000200/train_state.json   iteration, consumed samples, the run config
    DIR/iter_0000200/rng/rank_00000.pt  each rank's RNG states
    DIR/latest_checkpointed_iteration.txt   written last

A checkpoint is written under a temporary name and renamed when complete, and the `latest`
marker is replaced atomically after that, so a crash at any point leaves the previous checkpoint
as the one that loads.
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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

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


def save_checkpoint(root: str, iteration: int, model, optimizer, train_state: dict) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final_dir = checkpoint_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(os.path.join(tmp_dir, "rng"))
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp_dir)
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


def load_checkpoint(root: str, model, optimizer=None, restore_rng: bool = True) -> dict | None:
    """Load the latest checkpoint under root into model (and optimizer). Returns its train
    state, or None when root holds no checkpoint yet (a fresh run with --load == --save)."""
    iteration = latest_iteration(root)
    if iteration is None:
        return None
    ckpt = checkpoint_dir(root, iteration)
    if optimizer is None:
        model_sd = get_state_dict(model, [])[0]
        dcp.load({"model": model_sd}, checkpoint_id=ckpt)
        set_model_state_dict(model, model_sd, options=StateDictOptions(strict=True))
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if restore_rng:
        rng_file = os.path.join(ckpt, "rng", f"rank_{_rank():05d}.pt")
        set_rng_state(torch.load(rng_file, weights_only=False))
    with open(os.path.join(ckpt, "train_state.json")) as fh:
        return json.load(fh)
