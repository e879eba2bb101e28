"""ZeRO-1's per-rank bytes (DistributedOptimizer.memory_bytes) for real models, the table in
docs/parallelism.md ("Per-rank bytes"): each row builds the model with GPTModel and the
distributed optimizer over G gloo ranks (torchrun) and prints the line the trainer logs at startup.

    python benchmarks/bench_zero1_memory.py            # the doc's rows, ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ROWS = [  # (preset, vocabulary, ranks, parameter dtype)
    ("tiny", 8192, 2, "float32"), ("tiny", 8192, 4, "float32"),
    ("125m", 49152, 2, "float32"), ("125m", 49152, 4, "float32"),
    ("125m", 49152, 2, "bfloat16"), ("125m", 49152, 4, "bfloat16"),
]


def worker(preset: str, vocab: int, params_dtype: str) -> None:
    """One rank: build the model and the distributed optimizer, rank 0 prints the summary."""
    import torch
    import torch.distributed as dist

    from megatron_code.model.config import ModelConfig
    from megatron_code.model.gpt import GPTModel
    from megatron_code.parallel.distributed_optimizer import DistributedOptimizer
    from megatron_code.parallel.state import ParallelConfig, build_parallel_state
    from megatron_code.presets import get_preset
    from megatron_code.training.config import OptimizerConfig

    dist.init_process_group("gloo")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {**get_preset(preset), "vocab_size": vocab, "params_dtype": params_dtype}
    parallel = build_parallel_state(ParallelConfig(), torch.device("cpu"))
    model = GPTModel(ModelConfig(**{k: v for k, v in values.items() if k in fields}), parallel)
    optimizer = DistributedOptimizer(model, OptimizerConfig(), parallel, parallel.dp_cp_group)
    if dist.get_rank() == 0:
        millions = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| `{preset}` (vocab {vocab:,}) | {millions:.1f}M | {dist.get_world_size()} | {params_dtype} | "
              f"{optimizer.memory_summary()} |", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("PRESET", "VOCAB", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        preset, vocab, dtype = args.worker
        worker(preset, int(vocab), dtype)
        return
    print("| model | N | G | parameters | rank 0's line |\n| --- | --- | --- | --- | --- |")
    for preset, vocab, ranks, dtype in ROWS:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               os.path.abspath(__file__), "--worker", preset, str(vocab), dtype]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": REPO})
        if result.returncode:
            sys.exit(f"{preset} G={ranks} {dtype} failed:\n{result.stderr[-2000:]}")
        print(next(line for line in result.stdout.splitlines() if line.startswith("| `")))


if __name__ == "__main__":
    main()
