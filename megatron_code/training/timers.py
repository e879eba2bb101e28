"""Where a step's time goes: named phases (data-wait, forward, backward, grad-sync, ...), timed when
profiling and marked as NVTX ranges for Nsight Systems when asked.

Timing a phase on a GPU means synchronizing at its edges, which removes some overlap between
phases (e.g. the gradient reduction that overlaps backward), so the trainer times phases only in
profiling runs (`python -m megatron_code.profile`); a normal run's phases cost one Python
context manager each and nothing else.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimers:
    def __init__(self, device: torch.device, timed: bool = False, nvtx: bool = False):
        self.device = device
        self.timed = timed
        self.nvtx = nvtx and device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        if not (self.timed or self.nvtx):
            yield
            return
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        if self.timed:
            self._sync()
            start = time.perf_counter()
        try:
            yield
        finally:
            if self.timed:
                self._sync()
                self.seconds[name] += time.perf_counter() - start
            if self.nvtx:
                torch.cuda.nvtx.range_pop()

    def pop(self) -> dict[str, float]:
        """Seconds per phase since the last pop (phases that did not run are absent)."""
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return seconds
