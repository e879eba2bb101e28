"""Measured tensor memory of one real training step, to check the planner's memory model.

On CPU there is no allocator peak counter (torch.cuda.max_memory_allocated has no CPU twin), and
the process's RSS is dominated by the Python/torch runtime. `LiveTensorBytes` therefore counts
what the model predicts: the bytes of tensor storages alive at each moment. It is a
TorchDispatchMode (the mechanism of torch.distributed._tools.MemTracker, whose module-level
bookkeeping refuses the repeated root-module calls of gradient accumulation): every storage an
operator returns is counted once, until a weak reference says it was freed. Tensors that existed
before the step (parameters, gradients, optimizer state, the batch) are registered up front.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary, weakref


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages (`current`) and their maximum since the last reset (`peak`)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._seen = WeakIdKeyDictionary()  # storage -> (its bytes, the weakref keeping the callback)

    def track(self, *tensors) -> None:
        """Count tensors that were created before the mode was entered (idempotent per storage)."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = (nbytes, weakref.ref(storage, lambda _, n=nbytes: self._free(n)))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _free(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # the distributed optimizer wraps torch AdamW


def state_tensors(model: torch.nn.Module, optimizer) -> dict[str, list[torch.Tensor]]:
    """The tensors a training run keeps between steps, by the planner's components (plus the
    model's buffers, e.g. RoPE's inverse frequencies, which the planner neglects). The master
    weights of bf16 parameters (what the distributed optimizer steps then) are optimizer state."""
    inner = _torch_optimizer(optimizer)
    optimizer_params = [p for group in inner.param_groups for p in group["params"]]
    masters = optimizer_params if getattr(optimizer, "master_weights", False) else []
    weights = [*model.parameters(), *([] if masters else optimizer_params)]
    grads = [g for p in (*weights, *masters) for g in (p.grad, getattr(p, "main_grad", None)) if g is not None]
    adam = [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return {"weights": weights, "grads": grads, "optimizer": adam + masters, "buffers": list(model.buffers())}


def _reference_weights(trainer) -> list[torch.Tensor]:
    """DPO's frozen reference model's parameters (none in other modes)."""
    reference = getattr(trainer, "reference", None)
    return list(reference.parameters()) if reference is not None else []


class StepMemoryProbe:
    """Measures one training step of a real run: pass it as `train(cfg, prepare=probe)`. It
    counts live tensor bytes (LiveTensorBytes) from before the first step, so that what the run
    allocates once and keeps (Adam state, pipeline receive buffers) is counted, and reports the
    peak of step `step` (default 2: step 1 creates the Adam state), which covers loading the
    step's batch, forward, backward, gradient reduction, clipping and the optimizer step.
    `result`: the bytes of weights, gradients, optimizer state (and DPO's reference weights) held
    after the step, the peak before the optimizer step (`peak_before_step`) and during it
    (`peak_in_step`), and this process's rank and pipeline rank."""

    def __init__(self, step: int = 2):
        self.step = step
        self.result: dict | None = None
        self._tracker = LiveTensorBytes()
        self._trainer = self._handle = None
        self._measuring = False
        self._peak_before_step = 0

    def __call__(self, trainer) -> None:
        self._trainer = trainer
        trainer.step_hooks.append(self._after_step)
        self._handle = _torch_optimizer(trainer.optimizer).register_step_pre_hook(self._before_optimizer_step)
        self._tracker.track(*state_tensors(trainer.model, trainer.optimizer).values(), *_reference_weights(trainer))
        self._tracker.__enter__()

    def _after_step(self, iteration: int) -> None:
        if iteration == self.step - 1:
            self._tracker.reset_peak()
            self._measuring = True
        elif iteration == self.step:
            self._stop()

    def _before_optimizer_step(self, *_) -> None:
        if self._measuring:
            self._peak_before_step = self._tracker.peak
            self._tracker.reset_peak()

    def _stop(self) -> None:
        self._tracker.__exit__(None, None, None)
        self._handle.remove()
        self._measuring = False
        trainer = self._trainer
        held = {name: _storage_bytes(ts) for name, ts in state_tensors(trainer.model, trainer.optimizer).items()}
        held["reference"] = _storage_bytes(_reference_weights(trainer))
        self.result = {**held, "peak_before_step": self._peak_before_step, "peak_in_step": self._tracker.peak,
                       "pp_rank": trainer.parallel.rank("pp"), "rank": trainer.env.rank}
