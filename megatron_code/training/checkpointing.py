"""Checkpoints through torch.distributed.checkpoint (DCP).

Layout of --save DIR:

    DIR/iter_0000200/            DCP shards of {"model": ..., "optimizer": ...} (FQN keyed)
    DIR/iter_0000200/train_state.json   iteration, consumed samples, the run config
    DIR/iter_0000200/rng/rank_00000.pt  each rank's RNG states
    DIR/iter_0000200/fp8/rank_00000.pt  each rank's FP8 amax histories and scales (FP8 runs only)
    DIR/latest_checkpointed_iteration.txt   written last

A checkpoint is written under a temporary name and renamed when complete, and the `latest`
marker is replaced atomically after that, so a crash at any point leaves the previous checkpoint
as the one that loads. With async_save the DCP write runs in a background thread and the rename
+ marker happen when it completes (finish_pending_save); keep_last then prunes older iter_* dirs.

Every tensor is stored under its global name with its global (unsharded) shape: a rank's
tensor-parallel shard is wrapped as a DTensor over the TP mesh, and DCP writes the shards and
de-duplicates replicas (data-parallel copies). Loading under another layout therefore just
reads other slices of the same global tensors, and a reader that asks for one name gets the
full tensor (what checkpoints_convert relies on).

The distributed optimizer's Adam shards are gathered into this same form for saving and cut back
to the rank's shard when loading (see sharded_state), so ZeRO-1 on/off does not change the files.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import weakref

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor, Replicate, Shard

from megatron_code.errors import ConfigError
from megatron_code.parallel.distributed_optimizer import DistributedOptimizer
from megatron_code.model.config import ModelConfig
from megatron_code.model.te_linear import load_te_fp8_state, te_fp8_state, te_linears
from megatron_code.parallel.fused_wgrad import fp8_histories
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


def sharded_state(model, optimizer, parallel: ParallelState, gather_optimizer: bool = True,
                  optimizer_state: bool = True) -> dict:
    """{"model": {name: tensor}, "optimizer": {name: {exp_avg, exp_avg_sq}}, "optimizer_step": n}
    with every tensor in its global form (see the module docstring); without `optimizer_state`
    only "model" (the optimizer is then asked only for master weights).

    The model's tensors are always fp32: for bf16 parameters the distributed optimizer's master
    weights, gathered like its Adam state (targets for loading when gather_optimizer=False), so
    a checkpoint is the same whatever the parameters' dtype and loads exactly either way.

    The distributed optimizer (ZeRO-1) keeps only this rank's shard of the Adam state: for saving,
    the shards are all-gathered over the data-parallel group into each parameter's TP-local full
    tensor (collective; a temporary 8 bytes per local parameter on every rank), so the files are
    the same as without it and a checkpoint moves freely between the two. For loading
    (gather_optimizer=False) zeros of that shape are the targets, and _copy_loaded keeps the shard."""
    masters = (optimizer.full_master_weights(gather=gather_optimizer)
               if isinstance(optimizer, DistributedOptimizer) else {})
    state = {"model": {name: _global_view(masters.get(p, p.detach()), p, parallel)
                       for name, p in model.named_parameters()}}
    if optimizer is not None and optimizer_state:
        if isinstance(optimizer, DistributedOptimizer):
            full = optimizer.full_adam_state(gather=gather_optimizer)
            adam = {name: full[p] for name, p in model.named_parameters()}
            step = optimizer.step_count()
        else:
            adam = {name: _adam_state(optimizer, p) for name, p in model.named_parameters()}
            # AdamW keeps one step count per parameter; they are always equal.
            step = next(iter(adam.values()))["step"]
        state["optimizer"] = {
            name: {key: _global_view(s[key], p, parallel) for key in ("exp_avg", "exp_avg_sq")}
            for (name, p), s in zip(model.named_parameters(), adam.values())
        }
        state["optimizer_step"] = step.detach().clone().cpu()
    return state


def _copy_loaded(state: dict, model, optimizer) -> None:
    """Copy what DCP loaded back into the parameters (bf16 ones get it rounded, their master
    weights exactly) and, when `state` holds it, the Adam state (a DTensor wrapper may not share
    storage with the tensor it was built from)."""
    loaded = {p: _local(state["model"][name]) for name, p in model.named_parameters()}
    distributed = isinstance(optimizer, DistributedOptimizer)
    with torch.no_grad():
        for p, value in loaded.items():
            p.copy_(value)
    if distributed:
        optimizer.load_master_weights(loaded)
    if optimizer is None or "optimizer" not in state:
        return
    adam = {p: {key: _local(value) for key, value in state["optimizer"][name].items()}
            for name, p in model.named_parameters()}
    if distributed:
        optimizer.load_full_adam_state(adam, state["optimizer_step"])
        return
    with torch.no_grad():
        for p, values in adam.items():
            for key, value in values.items():
                optimizer.state[p][key].copy_(value)
            optimizer.state[p]["step"].copy_(state["optimizer_step"])


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


KILL_DURING_SAVE_ENV = "MCODE_TEST_KILL_DURING_SAVE"
"""Fault injection for tests only: when this variable equals the iteration being saved
(synchronously), rank 1 exits abruptly (os._exit(1)) after the DCP shards of that checkpoint are
written and before the save completes, the way a node dies mid-save. Never set it in a real run."""


@dataclasses.dataclass
class _PendingSave:
    """An async save in flight on this rank."""

    future: object
    root: str
    tmp_dir: str
    final_dir: str
    iteration: int
    keep_last: int | None
    process_group: object  # the default group when the save started


_pending: _PendingSave | None = None
# default process group -> the gloo group of its async saves; weak, so that both are freed with the
# run's groups (destroy_distributed) instead of living to interpreter exit.
_save_groups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def save_checkpoint(root: str, iteration: int, model, optimizer, parallel: ParallelState,
                    train_state: dict, async_save: bool = False, keep_last: int | None = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory, which exists on
    return for a synchronous save; an async save is published later by finish_pending_save
    (at most one is in flight: a new save first waits for the previous one)."""
    global _pending
    finish_pending_save(wait=True)
    final_dir = checkpoint_dir(root, iteration)
    tmp_dir = final_dir + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(os.path.join(tmp_dir, "rng"))
    _barrier()
    state = sharded_state(model, optimizer, parallel)
    # Small files first: once DCP has finished, the directory is complete.
    torch.save(rng_state(), os.path.join(tmp_dir, "rng", f"rank_{_rank():05d}.pt"))
    _save_fp8_state(tmp_dir, model, parallel)
    if _rank() == 0:
        with open(os.path.join(tmp_dir, "train_state.json"), "w") as fh:
            json.dump({**train_state, "iteration": iteration}, fh, indent=2, default=_json_default)
    if async_save:
        # _CopyStager copies the tensors to CPU memory before this returns (a second copy of
        # the whole state while the save is in flight), so training may change the parameters
        # right away; the writing runs in a background thread whose collectives use their own
        # gloo group (never interleaved with the training's collectives).
        future = dcp.async_save(state, checkpoint_id=tmp_dir, process_group=_async_save_group(),
                                async_stager=_CopyStager())
        _pending = _PendingSave(future, root, tmp_dir, final_dir, iteration, keep_last,
                                _default_group())
        return final_dir
    dcp.save(state, checkpoint_id=tmp_dir)
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(iteration) and _rank() == 1:
        os._exit(1)  # fault injection (tests only): see KILL_DURING_SAVE_ENV
    _barrier()
    if _rank() == 0:
        _finalize(root, tmp_dir, final_dir, iteration, keep_last)
    _barrier()
    return final_dir


class _CopyStager(AsyncStager):
    """Stages for async_save by copying every tensor (a DTensor's local shard) into fresh CPU
    memory: a snapshot that training can no longer change. It replaces DCP's DefaultStager, which
    in torch 2.13 fails on a DTensor built from a view with a storage offset (the distributed
    optimizer's parameters are views into flat buffers): the wrapper then reports a non-zero data
    pointer, and copying its (null) storage raises "invalid python storage"."""

    _synchronize_after_execute = False

    def stage(self, state_dict):
        return _copy_to_cpu(state_dict)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: stage() copies synchronously."""

    def close(self) -> None:
        """Nothing to release: the staged copies belong to the pending save."""


def _copy_to_cpu(obj):
    if isinstance(obj, dict):
        return {key: _copy_to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, DTensor):
        local = obj.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                  shape=obj.shape, stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    return obj


def finish_pending_save(wait: bool) -> str | None:
    """Publish this rank's async save once it has completed (wait=True: block until it has).
    Returns the published directory, else None. Not collective: DCP's last step gathers every
    rank's write results on rank 0 before rank 0's future completes, so when rank 0 sees it done
    all ranks' files (written before their async_save call, or by it) are on disk, and rank 0
    alone renames the directory and writes the marker. Other ranks only reap their futures."""
    global _pending
    pending = _pending
    if pending is None or not (wait or pending.future.done()):
        return None
    _pending = None
    if pending.process_group is not _default_group():
        return None  # left over from an earlier (failed) run in this process: never publish it
    pending.future.result()  # raises if the save failed; the previous checkpoint stays latest
    if _rank() == 0:
        _finalize(pending.root, pending.tmp_dir, pending.final_dir, pending.iteration, pending.keep_last)
    return pending.final_dir


def _default_group():
    return dist.distributed_c10d._get_default_group() if dist.is_initialized() else None


def _async_save_group():
    """A gloo group of all ranks for the background thread of async saves (one per process group
    lifetime: in-process tests create several)."""
    if not dist.is_initialized():
        return None
    default = _default_group()
    if default not in _save_groups:
        _save_groups[default] = dist.new_group(backend="gloo")
    return _save_groups[default]


def _finalize(root: str, tmp_dir: str, final_dir: str, iteration: int, keep_last: int | None) -> None:
    """Rank 0, once every rank's files are written: rename into place, mark latest, prune."""
    _publish(tmp_dir, final_dir)
    _write_text_atomically(os.path.join(root, LATEST_MARKER), f"{iteration}\n")
    if keep_last:
        delete_old_checkpoints(root, keep_last)


def delete_old_checkpoints(root: str, keep_last: int) -> list[str]:
    """Delete iter_* checkpoints beyond the newest keep_last up to the one `latest` names (which
    is kept). Those after it are left alone: after a rollback (the marker set back by hand) they
    belong to the abandoned segment, are not this run's to count, and its saves replace them as
    it reaches their iterations. Returns the deleted directories."""
    latest = latest_iteration(root)
    iterations = sorted(int(name[5:]) for name in os.listdir(root)
                        if name.startswith("iter_") and name[5:].isdigit())
    current = [i for i in iterations if latest is None or i <= latest]
    deleted = []
    for iteration in current[:-keep_last]:
        if iteration != latest:
            path = checkpoint_dir(root, iteration)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted


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


def is_iteration_dir(path: str) -> bool:
    """One checkpoint's own iter_* directory (rather than the --save root above it)."""
    return (os.path.isfile(os.path.join(path, "train_state.json"))
            and not os.path.isfile(os.path.join(path, LATEST_MARKER)))


def check_checkpoint_root(root: str, flag: str, weights_only: bool, complete: bool = True) -> None:
    """Refuse what would otherwise load nothing, the wrong thing, or fail deep inside a load:
    an iter_* directory for a full resume, and (with `complete`; a dry run may plan with a bare
    marker) a `latest` marker naming a missing checkpoint. A weights-only load (--finetune,
    --ref-load) may name one iteration's directory."""
    if is_iteration_dir(root):
        if weights_only:
            return
        parent = os.path.dirname(os.path.abspath(root))
        raise ConfigError(
            f"{flag} {root} is one checkpoint's directory. A full resume loads the latest checkpoint of "
            f"a --save directory: give {parent} (to resume from this iteration instead of the latest, write "
            f"its number into {parent}/{LATEST_MARKER}); or add --finetune to take only its weights.")
    iteration = latest_iteration(root) if complete else None
    if iteration is not None and not os.path.isfile(os.path.join(checkpoint_dir(root, iteration), "train_state.json")):
        raise ConfigError(f"{flag} {root}: {LATEST_MARKER} names iteration {iteration}, but "
                          f"{checkpoint_dir(root, iteration)}/train_state.json does not exist (deleted or moved?). "
                          f"Write the iteration of a complete iter_* directory into {LATEST_MARKER}.")


def _checkpoint_to_load(root: str) -> tuple[str, dict] | None:
    """(directory, train state) of the checkpoint that loading `root` reads: the one its `latest`
    marker names, or root itself when it is one iteration's directory; None when there is none."""
    if is_iteration_dir(root):
        ckpt = root
    else:
        iteration = latest_iteration(root)
        if iteration is None:
            return None
        ckpt = checkpoint_dir(root, iteration)
    with open(os.path.join(ckpt, "train_state.json")) as fh:
        return ckpt, json.load(fh)


def latest_iteration(root: str) -> int | None:
    """Iteration named by the `latest` marker (or of an iter_* directory given itself), or None
    when there is no complete checkpoint."""
    if is_iteration_dir(root):
        return _checkpoint_to_load(root)[1]["iteration"]
    marker = os.path.join(root, LATEST_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker) as fh:
        return int(fh.read().strip())


def load_checkpoint(root: str, model, optimizer, parallel: ParallelState, restore_rng: bool = True,
                    optimizer_state: bool = True, restore_fp8: bool | None = None) -> dict | None:
    """Load the latest checkpoint under root (or root itself, one iteration's directory) into
    model (and optimizer, unless None or without `optimizer_state`: then only the master weights
    of bf16 parameters), whatever layout saved it, with the RNG states (`restore_rng`) and FP8
    scaling state (`restore_fp8`, default: as `restore_rng`). Returns its train state, or None
    when root holds no checkpoint yet (a fresh run with --load == --save)."""
    found = _checkpoint_to_load(root)
    if found is None:
        return None
    ckpt, train_state = found
    state = sharded_state(model, optimizer, parallel, gather_optimizer=False, optimizer_state=optimizer_state)
    dcp.load(state, checkpoint_id=ckpt)
    _copy_loaded(state, model, optimizer)
    if restore_rng:  # a full resume: the run goes on as if never stopped
        set_rng_state(torch.load(_rng_file(ckpt), weights_only=False))
    if restore_rng if restore_fp8 is None else restore_fp8:
        _restore_fp8_state(ckpt, model, parallel)
    return train_state


def _parallel_layout(parallel: ParallelState) -> dict:
    return {"tp": parallel.tp, "pp": parallel.pp, "cp": parallel.cp, "dp": parallel.dp}


def _fp8_file(ckpt: str) -> str:
    return os.path.join(ckpt, "fp8", f"rank_{_rank():05d}.pt")


def _save_fp8_state(tmp_dir: str, model, parallel: ParallelState) -> None:
    """Per rank, like the RNG states: each rank's amaxes come from its own shards and batches.
    The torch backend's histories, or each Transformer Engine linear's FP8 metadata (its extra state)."""
    histories, te_layers = fp8_histories(model), te_linears(model)
    if histories or te_layers:
        os.makedirs(os.path.join(tmp_dir, "fp8"), exist_ok=True)
        torch.save({"layout": _parallel_layout(parallel), "settings": _fp8_settings(model),
                    "histories": [h.state_dict() for h in histories], "te": te_fp8_state(model)}, _fp8_file(tmp_dir))


def _restore_fp8_state(ckpt: str, model, parallel: ParallelState) -> None:
    """This rank's saved FP8 state when the layout and FP8 layers are the ones that saved it;
    otherwise (another layout, or a checkpoint from a BF16 run) it starts empty: the first step
    casts with current scaling (torch backend; TE starts from scale 1) and refills the histories,
    as in a new FP8 run."""
    histories, te_layers = fp8_histories(model), te_linears(model)
    if not histories and not te_layers:
        return
    path = _fp8_file(ckpt)
    saved = torch.load(path, weights_only=False) if os.path.exists(path) else None
    why = _fp8_state_mismatch(saved, histories, te_layers, parallel, _fp8_settings(model))
    if why is not None:
        if _rank() == 0:
            print(f"FP8 amax histories not restored ({why}): the first step starts them afresh", flush=True)
        return
    device = next(model.parameters()).device
    for history, state in zip(histories, saved["histories"]):
        history.load_state_dict(state, device)
    if te_layers:
        load_te_fp8_state(model, saved["te"])


FP8_STATE_FLAGS = ("fp8_format", "fp8_recipe", "fp8_margin", "fp8_backend", "fp8_amax_compute_algo")


def _fp8_settings(model) -> dict:
    """The FP8 flags a saved scale depends on (a scale made for e5m2 gradients overflows e4m3)."""
    config = next(m.config for m in model.modules() if isinstance(getattr(m, "config", None), ModelConfig))
    return {name: getattr(config, name) for name in FP8_STATE_FLAGS}


def _fp8_state_mismatch(saved, histories, te_layers, parallel: ParallelState, settings: dict) -> str | None:
    """Why a saved FP8 state cannot be restored into this model (None when it can)."""
    layout = _parallel_layout(parallel)
    if saved is None:
        return "the checkpoint has none"
    if saved["layout"] != layout:
        return f"saved under {saved['layout']}, this run is {layout}"
    changed = {k: (v, settings[k]) for k, v in saved.get("settings", settings).items() if settings.get(k) != v}
    if changed:
        return "saved with other FP8 settings: " + ", ".join(
            f"--{k.replace('_', '-')} {old} (now {new})" for k, (old, new) in changed.items())
    if sorted(saved.get("te", {})) != sorted(te_layers):
        return "saved with another --fp8-backend or other layers in FP8"
    fits = ([s["slots"] for s in saved["histories"]] == [len(h.targets) for h in histories]
            and all(s["history_len"] == h.history_len for s, h in zip(saved["histories"], histories)))
    return None if fits else "saved with another --fp8-amax-history-len or other layers in FP8"


def read_train_state(root: str) -> dict | None:
    """train_state.json of the checkpoint loading root reads (iteration, consumed samples, run
    config), or None."""
    found = _checkpoint_to_load(root)
    return None if found is None else found[1]


def _rng_file(ckpt: str) -> str:
    """This rank's RNG file, or rank 0's when the checkpoint was saved by fewer ranks (resharded
    resume: the data order does not depend on these states, and there is no dropout)."""
    own = os.path.join(ckpt, "rng", f"rank_{_rank():05d}.pt")
    return own if os.path.exists(own) else os.path.join(ckpt, "rng", "rank_00000.pt")
