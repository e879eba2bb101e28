"""The amax histories and scales of many FP8 tensor slots, held in one set of device buffers so
that delayed scaling costs a handful of kernels per training step instead of several per cast.

    history   [slots, history_len]  newest amax first
    pending   [slots]               max |x| of the casts since the last advance (the casts fold
                                    into it: an atomic max inside the fused cast kernel)
    scale     [slots]               fp8_max / 2^margin / amax(history); what the casts multiply by
    scale_inv [slots]               1 / scale; what the FP8 GEMMs multiply the product by

`advance()` appends each slot's pending amax to its history and recomputes every scale, all slots
at once. Inside a training step (`active`, set by megatron_code.parallel.fused_wgrad's
`cached_weight_casts`) the scales stay fixed and the histories advance once, when the step ends
(Transformer Engine advances at the end of each fp8_autocast region; here the region is the step:
the scale a micro-batch's forward used is the one its backward sees). Outside a step each cast
advances its own slot at once, so a plain training loop still gets delayed scaling, one use behind.

A slot's first cast has no history; it uses its own amax (current scaling) until its first advance.
The buffers live on the device of the first tensor cast; they are not module buffers, so
`model.to(bfloat16)` never degrades them; checkpoints carry them per rank (state_dict /
load_state_dict, megatron_code.training.checkpointing), so a resumed run continues with the scales
the uninterrupted one has.
"""
from __future__ import annotations

import torch

FP32_MAX = torch.finfo(torch.float32).max
CELL_STRIDE = 4  # fp32 elements between two slots' scale cells (16 bytes)


def scale_for_target(amax: torch.Tensor, target) -> torch.Tensor:
    """target / amax elementwise (fp32); 1 where amax is 0, NaN, infinite, or so small that the
    scale would overflow. `target` is a float or a tensor broadcastable against amax."""
    amax = amax.float()
    usable = (amax >= target / FP32_MAX) & (amax < float("inf"))  # NaN fails both
    return torch.where(usable, target / amax, 1.0)


class AmaxHistories:
    """Histories of the tensor slots of one model (or one stand-alone linear layer)."""

    def __init__(self, history_len: int, most_recent: bool):
        self.history_len, self.most_recent = history_len, most_recent
        self.targets: list[float] = []  # fp8_max / 2^margin of each slot's format
        self.initialized: list[bool] = []  # advanced at least once since its first cast
        self.records: list[int] = []  # casts recorded, per slot (host-side count, for tests and logs)
        self.recorded: set[int] = set()  # slots with a pending amax
        self.active = False
        self.history = self.pending = self.scale = self.scale_inv = self.target = None
        self._cells: dict[str, list[torch.Tensor]] = {}

    def add_slot(self, target: float) -> int:
        self.targets.append(target)
        self.initialized.append(False)
        self.records.append(0)
        return len(self.targets) - 1

    def cell(self, name: str, slot: int, device: torch.device) -> torch.Tensor:
        """A 0-d view of buffer `name` (pending, scale, scale_inv) at `slot`, on `device`."""
        self._allocate(device)
        return self._cells[name][slot]

    def _allocate(self, device: torch.device) -> None:
        slots = len(self.targets)
        if self.history is not None and self.history.device == device and self.history.shape[0] == slots:
            return
        self.history = torch.zeros(slots, self.history_len, device=device)
        self.pending = torch.zeros(slots, device=device)
        # One 16-byte row per slot, column 0 used: cuBLASLt refuses FP8 scale pointers that are not
        # 16-byte aligned (CUBLAS_STATUS_NOT_SUPPORTED on an H200 for 4-byte-spaced cells).
        self.scale = torch.ones(slots, CELL_STRIDE, device=device)[:, 0]
        self.scale_inv = torch.ones(slots, CELL_STRIDE, device=device)[:, 0]
        self.target = torch.tensor(self.targets, device=device)
        self.initialized = [False] * slots
        self.recorded.clear()
        self._cells = {name: list(getattr(self, name).unbind(0)) for name in ("pending", "scale", "scale_inv")}

    def note(self, slot: int) -> None:
        """`slot`'s pending cell was written (by the fused cast kernel or `record`)."""
        self.recorded.add(slot)
        self.records[slot] += 1

    def record(self, slot: int, amax: torch.Tensor) -> None:
        """Fold an amax computed outside the fused cast into the slot's pending amax."""
        cell = self.cell("pending", slot, amax.device)
        torch.maximum(cell, amax.float(), out=cell)
        self.note(slot)

    def advance(self, slot: int | None = None) -> None:
        """Push the pending amaxes into the histories and recompute the scales: every slot, or one."""
        if self.history is None or not self.recorded or (slot is not None and slot not in self.recorded):
            return
        rows = slice(None) if slot is None else slice(slot, slot + 1)
        history, pending = self.history[rows], self.pending[rows]  # [r, L], [r]
        # A slot that was not cast since the last advance keeps its newest amax (a zero entry would
        # make the most-recent algorithm fall back to scale 1).
        newest = torch.where(pending > 0, pending, history[:, 0])
        history.copy_(history.roll(1, dims=1))
        history[:, 0] = newest
        pending.zero_()
        amax = history[:, 0] if self.most_recent else history.amax(dim=1)
        scale = scale_for_target(amax, self.target[rows])
        self.scale[rows] = scale
        torch.reciprocal(scale, out=self.scale_inv[rows])
        for done in (self.recorded if slot is None else [slot]):
            self.initialized[done] = True
        self.recorded = set() if slot is None else self.recorded - {slot}

    def state_dict(self) -> dict:
        """What a resumed run needs to go on with the same scales: the histories, the scales and
        which slots have been advanced. Pending amaxes are empty between steps, where checkpoints
        are taken. CPU tensors; `history` None when nothing was cast yet."""
        state = {"slots": len(self.targets), "history_len": self.history_len, "history": None}
        if self.history is not None:
            state.update(history=self.history.cpu().clone(), scale=self.scale.cpu().clone(),
                         initialized=list(self.initialized))
        return state

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Restore state_dict()'s output onto `device` (where the casts will run)."""
        mine = (len(self.targets), self.history_len)
        if (state["slots"], state["history_len"]) != mine:
            raise ValueError(f"FP8 amax histories of {state['slots']} slots x {state['history_len']} steps "
                             f"cannot be loaded into {mine[0]} slots x {mine[1]} steps")
        if state["history"] is None:
            return
        self._allocate(device)
        self.history.copy_(state["history"])
        self.scale.copy_(state["scale"])
        torch.reciprocal(self.scale, out=self.scale_inv)
        self.pending.zero_()
        self.initialized = list(state["initialized"])
