"""Parallel layouts on this machine: step time and per-rank memory, distributed optimizer on and
off, and each rank's measured parameter + optimizer-state bytes against the analytic value.

    python benchmarks/bench_layouts.py                  # tiny-sized model, CPU/gloo
    python benchmarks/bench_layouts.py --json out.json

Every layout is a real `torchrun -m megatron_code.train` run on the same data (built from the
committed test fixture corpus); step time is the median over the steps after --warmup. The
analytic bytes per rank: parameters 4 N / (TP x PP) (fp32; norms are replicated over TP, so
slightly more), Adam state 8 N / (TP x PP), divided by DP x CP with the distributed optimizer.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_tools.preprocess_data import preprocess_data  # noqa: E402
from megatron_code.model.config import ModelConfig  # noqa: E402
from megatron_code.tokenizer import SentencePieceTokenizer  # noqa: E402

FIXTURES = os.path.join(REPO, "tests", "fixtures")
MODEL = dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4,
             group_query_attention=True, num_query_groups=2, untie_embeddings_and_output_weights=True)
LAYOUTS = [  # (name, processes, flags)
    ("1 process", 1, []),
    ("TP2", 2, ["--tensor-model-parallel-size", "2"]),
    ("TP2 + SP", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ("DP2", 2, []),
    ("DP2 + dist-opt", 2, ["--use-distributed-optimizer"]),
    ("CP2", 2, ["--context-parallel-size", "2"]),
    ("PP2 1f1b", 2, ["--pipeline-model-parallel-size", "2"]),
    ("DP4", 4, []),
    ("DP4 + dist-opt", 4, ["--use-distributed-optimizer"]),
    ("TP2 x DP2 + dist-opt", 4, ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]),
]


def flag_value(flags: list[str], name: str, default: int = 1) -> int:
    return int(flags[flags.index(name) + 1]) if name in flags else default


def analytic_bytes(nproc: int, flags: list[str], vocab: int) -> tuple[float, float]:
    tp = flag_value(flags, "--tensor-model-parallel-size")
    pp = flag_value(flags, "--pipeline-model-parallel-size")
    cp = flag_value(flags, "--context-parallel-size")
    n = ModelConfig(**MODEL, vocab_size=vocab).num_parameters(tp) / (tp * pp)
    shards = nproc // (tp * pp) if "--use-distributed-optimizer" in flags else 1
    del cp  # CP ranks hold the same parameters; with ZeRO they are part of the shard group
    return 4 * n, 8 * n / shards


def run_layout(nproc: int, flags: list[str], data: str, args, workdir: str) -> dict:
    metrics = os.path.join(workdir, "metrics.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_code.train", "--data-path", data,
           "--tokenizer-model", os.path.join(FIXTURES, "code_bpe_2048.model"),
           "--train-iters", str(args.steps), "--lr-warmup-iters", "1", "--eval-interval", "0",
           "--seq-length", str(args.seq), "--micro-batch-size", str(args.micro_batch),
           "--global-batch-size", str(args.global_batch), "--num-workers", "0", "--log-interval", "1000",
           "--metrics-file", metrics, *[f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items() if not isinstance(v, bool)],
           "--group-query-attention", "--untie-embeddings-and-output-weights", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    records = [json.loads(line) for line in open(metrics)] if os.path.exists(metrics) else []
    steps = [r for r in records if "loss" in r]
    memory = next((r["memory_per_rank"] for r in records if "memory_per_rank" in r), None)
    if len(steps) != args.steps or memory is None:
        raise RuntimeError(f"layout failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    times = [r["ms_per_step"] for r in steps[args.warmup:]]
    return {"ms_per_step": statistics.median(times), "loss": steps[-1]["loss"], "memory": memory}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="names of layouts to run (default: all)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    vocab = SentencePieceTokenizer(os.path.join(FIXTURES, "code_bpe_2048.model")).vocab_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = preprocess_data(os.path.join(FIXTURES, "stdlib_sample.jsonl"), os.path.join(FIXTURES, "code_bpe_2048.model"),
                               os.path.join(tmp, "sample"), progress=False).outputs["text"]
        print(f"{'layout':24} {'procs':>5} {'ms/step':>9} {'peak MiB/rank':>14} {'params MiB r0':>14} "
              f"{'(analytic)':>10} {'Adam MiB r0':>12} {'(analytic)':>10} {'final loss':>10}")
        for name, nproc, flags in LAYOUTS:
            if args.only and name not in args.only:
                continue
            with tempfile.TemporaryDirectory(dir=tmp) as workdir:
                result = run_layout(nproc, flags, data, args, workdir)
            params, adam = analytic_bytes(nproc, flags, vocab)
            r0 = result["memory"][0]
            peak = max(r["peak_mem_gib"] for r in result["memory"]) * 1024
            row = dict(layout=name, processes=nproc, **result, analytic_params=params, analytic_adam=adam)
            rows.append(row)
            print(f"{name:24} {nproc:>5} {result['ms_per_step']:>9.0f} {peak:>14.0f} {r0['params'] / 2**20:>14.2f} "
                  f"{params / 2**20:>10.2f} {r0['optimizer'] / 2**20:>12.2f} {adam / 2**20:>10.2f} {result['loss']:>10.4f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
