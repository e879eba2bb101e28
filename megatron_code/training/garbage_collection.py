"""Garbage collection at the same steps on every rank (Megatron-LM's --manual-gc).

Python's cyclic collector runs whenever a process's allocation counts cross its thresholds, so at
a different moment on each rank. A full collection of a training process (autograd graphs,
tensors, data-loader state: millions of objects) pauses it for tens of milliseconds or more, and
under data parallelism every collective waits for the rank that is collecting: with hundreds of
ranks most steps pay some rank's pause. With --manual-gc the automatic collector is off during
training, and every rank collects at the same steps, right after launching one, while its GPU
works through it."""
from __future__ import annotations

import gc
from contextlib import contextmanager

from megatron_code.training.config import TrainingConfig


@contextmanager
def manual_garbage_collection(training: TrainingConfig):
    """With --manual-gc: automatic collection off inside the block (after one full collection of
    the setup's garbage) and back on after it, however the block ends."""
    if not training.manual_gc:
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def collect_if_due(training: TrainingConfig, iteration: int) -> None:
    """A collection of the young generations every --manual-gc-interval steps: what the steps
    themselves leave. Generation 1, not a full collection (as torchtitan and OLMo-core do): a full
    one walks every tracked object of the process, 448K in a CPU run of the tiny model, 0.22 s
    each (benchmarks/bench_gc.py), while the steps' garbage is young."""
    if training.manual_gc and training.manual_gc_interval and iteration % training.manual_gc_interval == 0:
        gc.collect(1)


def collect_after_validation(training: TrainingConfig) -> None:
    """Validation leaves its own garbage (its batches, outputs), and it is a pause anyway: a full
    collection there also reaches the old generation, which the disabled collector never would."""
    if training.manual_gc:
        gc.collect()
