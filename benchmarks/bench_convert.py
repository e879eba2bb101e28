"""Benchmark of checkpoints_convert on a 7B-shaped bf16 model (a script, not a test).

1. writes a random Hugging Face LlamaForCausalLM directory with the `7b` preset's shape
   (32 x 4096, FFN 14336, 32/8 heads, untied, vocab 49,152) in bfloat16, streamed to disk;
2. `mcode-convert from-hf` it to our DCP format, then `mcode-convert to-hf` back, each in its own
   process, measuring wall time, throughput (model bytes / wall second) and peak RSS (getrusage of
   that child);
3. checks the round trip is bit-exact for every tensor.

Target (issue 4): peak RSS < 2 GiB + the largest output shard. Disk: two model copies at a
time (~30 GB at 32 layers); --num-layers cuts the model when disk or time is short, and the report
extrapolates to 32 layers from the measured throughput.

    python benchmarks/bench_convert.py                      # full 7B shape
    python benchmarks/bench_convert.py --num-layers 8       # a quarter of the layers
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints_convert.adapters import LlamaAdapter  # noqa: E402
from checkpoints_convert.safetensors_io import HFWeights, ShardedWriter, nbytes, parse_size  # noqa: E402
from megatron_code.model.config import ModelConfig  # noqa: E402
from megatron_code.presets import get_preset  # noqa: E402

GiB = 2**30


def model_config(num_layers: int, vocab_size: int) -> ModelConfig:
    preset = get_preset("7b")
    fields = {f for f in ModelConfig.__dataclass_fields__}
    values = {k: v for k, v in preset.items() if k in fields}
    return ModelConfig(**{**values, "num_layers": num_layers, "vocab_size": vocab_size})


def hf_entries(config: ModelConfig) -> list[tuple[str, torch.dtype, tuple]]:
    rules = LlamaAdapter().rules(config, config.padded_vocab_size(1))
    return [(name, torch.bfloat16, shape) for r in rules for name, shape in r.hf.items()]


class RandomPool:
    """Random bf16 values; tensor i is a slice at a seeded offset (distinct contents per tensor
    without generating 7 billion normals)."""

    def __init__(self, largest: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = (torch.randn(2 * largest, generator=g) * 0.02).to(torch.bfloat16)
        self.largest = largest

    def tensor(self, index: int, shape: tuple) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        offset = (index * 7_919_993) % (self.largest + 1)
        return self.data[offset: offset + n].view(shape)


def write_random_hf(out_dir: str, config: ModelConfig, entries, pool: RandomPool, max_shard: int) -> float:
    os.makedirs(out_dir)
    start = time.perf_counter()
    writer = ShardedWriter(out_dir, entries, max_shard)
    for i, (name, _, shape) in enumerate(entries):
        writer.write(name, pool.tensor(i, shape))
    writer.finish()
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(LlamaAdapter().hf_config(config, torch.bfloat16, {"bos_token_id": 1, "eos_token_id": 2}), fh)
    return time.perf_counter() - start


# The child reports its own high-water RSS (VmHWM): getrusage's ru_maxrss of a child also counts
# the parent's resident set at fork time, which here holds the random pool.
_CHILD = """
import sys
from checkpoints_convert.__main__ import main
code = main(sys.argv[2:])
with open('/proc/self/status') as fh, open(sys.argv[1], 'w') as out:
    out.write(next(line for line in fh if line.startswith('VmHWM')).split()[1])
sys.exit(code)
"""


def run_measured(argv: list[str], workdir: str) -> dict:
    """Run one conversion in a child process; wall seconds and the child's peak RSS."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rss_file = os.path.join(workdir, "peak_rss_kib")
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-c", _CHILD, rss_file, *argv, "--quiet"], env=env)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"conversion {argv[0]} failed with exit code {code}")
    with open(rss_file) as fh:
        return {"wall_s": wall, "peak_rss_gib": int(fh.read()) * 1024 / GiB}


def check_round_trip(out_dir: str, entries, pool: RandomPool) -> None:
    weights = HFWeights(out_dir)
    for i, (name, dtype, shape) in enumerate(entries):
        got = weights.get(name)
        if got.dtype != dtype or not torch.equal(got, pool.tensor(i, shape)):
            raise SystemExit(f"round trip changed {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=32, help="layers of the 7B shape to generate (default 32)")
    parser.add_argument("--vocab-size", type=int, default=49152, help="vocabulary (default 49,152: the code tokenizer)")
    parser.add_argument("--workdir", default="/tmp/bench_convert", help="scratch directory (deleted at the end)")
    parser.add_argument("--max-shard-size", default="5GB", help="HF shard size (default 5GB)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()

    config = model_config(args.num_layers, args.vocab_size)
    entries = hf_entries(config)
    model_bytes = sum(nbytes(shape, dt) for _, dt, shape in entries)
    layer_bytes = sum(nbytes(shape, dt) for name, dt, shape in entries if name.startswith("model.layers.0."))
    full = model_config(32, args.vocab_size)
    full_bytes = sum(nbytes(shape, dt) for _, dt, shape in hf_entries(full))
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    free = shutil.disk_usage(args.workdir).free
    if free < 2.05 * model_bytes:  # two copies at a time: the input is deleted before to-hf
        raise SystemExit(f"need ~{2.05 * model_bytes / 1e9:.1f} GB free in {args.workdir}, have {free / 1e9:.1f} GB; "
                         "use --num-layers to cut the model")
    hf_in, ours, hf_out = (os.path.join(args.workdir, d) for d in ("hf_in", "ours", "hf_out"))
    max_shard = parse_size(args.max_shard_size)
    print(f"model: {args.num_layers} layers of the 7b shape, vocab {args.vocab_size}, bf16: {model_bytes / 1e9:.2f} GB "
          f"({layer_bytes / 1e6:.0f} MB per layer); full 32-layer model {full_bytes / 1e9:.2f} GB", flush=True)
    try:
        largest = max(nbytes(shape, torch.bfloat16) // 2 for _, _, shape in entries)
        pool = RandomPool(largest)
        gen_s = write_random_hf(hf_in, config, entries, pool, max_shard)
        largest_shard = ShardedWriter("", entries, max_shard).largest_shard_bytes
        print(f"generated HF input in {gen_s:.1f} s", flush=True)
        results = {"from-hf": run_measured(["from-hf", hf_in, ours], args.workdir)}
        print(f"from-hf: {results['from-hf']}", flush=True)
        shutil.rmtree(hf_in)  # frees disk for the next copy; the pool regenerates the contents
        results["to-hf"] = run_measured(["to-hf", ours, hf_out, "--no-tokenizer", "--max-shard-size", args.max_shard_size],
                                        args.workdir)
        print(f"to-hf: {results['to-hf']}", flush=True)
        check_round_trip(hf_out, entries, pool)
        print("round trip: every tensor bit-exact", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    target = 2 + largest_shard / GiB
    print(f"\n{'direction':8} | {'wall s':>7} | {'GB/s':>5} | {'peak RSS GiB':>12} | target < {target:.2f} GiB "
          f"(2 GiB + largest shard {largest_shard / GiB:.2f} GiB) | 32-layer estimate")
    for direction, r in results.items():
        rate = model_bytes / 1e9 / r["wall_s"]
        print(f"{direction:8} | {r['wall_s']:7.1f} | {rate:5.2f} | {r['peak_rss_gib']:12.2f} | "
              f"{'met' if r['peak_rss_gib'] < target else 'MISSED':6} | {full_bytes / 1e9 / rate:.0f} s at {rate:.2f} GB/s")
    print(json.dumps({"num_layers": args.num_layers, "model_bytes": model_bytes, "largest_shard_bytes": largest_shard,
                      "cpus": os.cpu_count(), **{k: v for k, v in results.items()}}))


if __name__ == "__main__":
    main()
