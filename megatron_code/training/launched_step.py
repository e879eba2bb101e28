"""A training step whose work is queued on the device but whose results the host has not read.

The trainer never reads a step's loss or gradient norm right after launching it: a host read
(`float(loss)`, `.item()`, a blocking copy) waits for every kernel queued before it, and the GPU
then idles while Python logs, loads the next batch and launches the next step's first kernels.
Instead each step's scalars are copied into pinned host memory behind a CUDA event, and the
trainer reads them after it has launched the following step: the GPU always has a step queued.
Megatron-LM and torchtitan read their losses on the host only at log intervals for the same reason.

On CPU everything runs synchronously; the same objects then simply hold finished values.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


class StepClock:
    """The duration of one step. On CUDA from events on the compute stream: from when the GPU
    reaches the step's first work to its last, so the host running ahead (loading data and
    launching while the GPU finishes the previous step) costs nothing, and host time the GPU did
    wait for (an empty queue) counts. On CPU from the host clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._start, self._end = self._now(), None
        self._marks: dict = {}

    def _now(self):
        """A CUDA event recorded on the current stream, or the host clock's reading."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self) -> None:
        """Mark the end of the step's launched work."""
        self._end = self._now()

    def mark(self, name: str) -> None:
        """Mark a point inside the step (on CUDA: where the GPU reaches the work launched so far)."""
        self._marks[name] = self._now()

    def seconds(self, start: str | None = None, end: str | None = None) -> float:
        """From the step's start (or mark `start`) to its end (or mark `end`); a mark never made
        stands for the step's start or end. Waits for the step's work on CUDA (call it once the
        step's results are read)."""
        first, last = self._marks.get(start, self._start), self._marks.get(end, self._end)
        if self.cuda:
            last.synchronize()
            return first.elapsed_time(last) / 1000.0
        return last - first


class DeviceScalars:
    """Named 0-d tensors of one step, copied to the host without waiting for them."""

    def __init__(self, values: dict[str, torch.Tensor]):
        self.names = list(values)
        # One [n] float64 tensor on the device, one copy to the host.
        stacked = torch.stack([v.detach().to(torch.float64).reshape(()) for v in values.values()])
        self._ready = None
        if stacked.is_cuda:
            self._host = torch.empty(len(self.names), dtype=torch.float64, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = stacked

    def read(self) -> dict[str, float]:
        """The values; on CUDA waits for the work that produced them (and nothing queued after)."""
        if self._ready is not None:
            self._ready.synchronize()
        return dict(zip(self.names, self._host.tolist()))


@dataclass
class LaunchedStep:
    """One optimizer step as the trainer launched it, to be read back and logged later."""

    iteration: int
    """The iteration this step completes (1-based)."""
    lr: float
    """The learning rate it applied."""
    scalars: DeviceScalars
    """Its loss, gradient norm, exit-signal agreement and mode-specific values."""
    clock: StepClock
    """Its duration, read once the scalars are."""
    consumed_samples: int
    """Training samples read once this step is done."""
    phase_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds per phase when phase timing is on (megatron_code.profile), else empty."""
    data_wait_seconds: float = 0.0
    """Host time spent waiting for its micro-batches."""
