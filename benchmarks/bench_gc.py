"""What Python's garbage collector costs a training process, with and without --manual-gc: the
collections during the training loop (counted through gc.callbacks, each timed), per generation,
for the same CPU run of the tiny model, and what one full collection of the process costs. Under data parallelism each such pause, at a different
moment on each rank, stalls every rank's next collective (docs/training.md, "Garbage collection").

    python benchmarks/bench_gc.py [--steps 40]      # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


class CollectionLog:
    """Each collection between the first step's launch and the loop's end: (generation, seconds)."""

    def __init__(self):
        self.started, self.collections, self.active = None, [], False

    def __call__(self, phase: str, info: dict) -> None:
        if not self.active:
            return
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.collections.append((info["generation"], time.perf_counter() - self.started))
            self.started = None


def run(data_prefix: str, tokenizer: str, steps: int, manual_gc: bool) -> list[tuple[int, float]]:
    from megatron_code.presets import get_preset
    from megatron_code.training.arguments import run_config_from_values
    from megatron_code.training.trainer import train

    values = {**get_preset("tiny"), "data_path": [data_prefix], "tokenizer_model": tokenizer, "train_iters": steps,
              "lr_warmup_iters": 2, "eval_interval": 0, "log_interval": 10**6, "num_workers": 0,
              "micro_batch_size": 4, "global_batch_size": 4, "seq_length": 128,
              "manual_gc": manual_gc, "manual_gc_interval": 10 if manual_gc else 0}
    log = CollectionLog()

    def watch(trainer):
        trainer.step_hooks.append(lambda iteration: setattr(log, "active", True))
        loop = trainer.run
        trainer.run = lambda: (loop(), setattr(log, "active", False))[0]

    gc.callbacks.append(log)
    try:
        train(run_config_from_values(values), prepare=watch)
    finally:
        gc.callbacks.remove(log)
    return log.collections


def row(name: str, collections: list[tuple[int, float]], steps: int, objects: int) -> str:
    counts = [sum(1 for g, _ in collections if g == generation) for generation in range(3)]
    times = [seconds * 1e3 for _, seconds in collections]
    return (f"| {name} | {steps} | {counts[0]} / {counts[1]} / {counts[2]} | {sum(times):.1f} | "
            f"{max(times, default=0):.2f} | {objects:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from data_tools.preprocess_data import preprocess_data
    from tests.conftest import CORPUS, TOKENIZER

    with tempfile.TemporaryDirectory() as tmp:
        prefix = preprocess_data(CORPUS, TOKENIZER, os.path.join(tmp, "sample"), workers=1,
                                 progress=False).outputs["text"]
        results = {name: run(prefix, TOKENIZER, args.steps, manual) for name, manual in
                   (("automatic", False), ("--manual-gc --manual-gc-interval 10", True))}
    objects = len(gc.get_objects())
    started = time.perf_counter()
    gc.collect()
    full_ms = (time.perf_counter() - started) * 1e3
    print("| collector | steps | collections gen 0 / 1 / 2 | total pause ms | longest pause ms | tracked objects |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, collections in results.items():
        print(row(name, collections, args.steps, objects))
    print(f"\none full collection (generation 2) of this process afterwards: {full_ms:.0f} ms "
          f"({objects:,} tracked objects): what an automatic one costs the rank it lands on")


if __name__ == "__main__":
    main()
