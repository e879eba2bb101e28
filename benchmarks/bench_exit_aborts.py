"""How often a 2-rank gloo job that used functional collectives (DTensor's full_tensor, funcol.all_reduce) aborts at interpreter
exit ("terminate called without an active exception"), with and without a garbage collection after
destroy_process_group (what megatron_code.distributed.destroy_distributed does): docs/training.md,
"End of a run".

    python benchmarks/bench_exit_aborts.py --runs 30     # about 5 min on 2 cores
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

WORKER = r'''
import gc, sys
import torch, torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
for _ in range(20):
    full = distribute_tensor(torch.randn(64, 64), mesh, [Shard(0)]).full_tensor()
    summed = funcol.all_reduce(torch.ones(8), "sum", mesh)
    summed = summed.wait() if hasattr(summed, "wait") else summed
dist.destroy_process_group()
if sys.argv[1] == "collect":
    del full, summed, mesh
    gc.collect()
'''


def aborts(mode: str, runs: int, script: str) -> int:
    failed = 0
    for _ in range(runs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script, mode]
        result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        failed += result.returncode != 0
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--script", default="/tmp/bench_exit_aborts_worker.py", help="where the worker is written")
    args = parser.parse_args()
    with open(args.script, "w") as fh:
        fh.write(WORKER)
    print("| after destroy_process_group | failed runs |\n| --- | --- |")
    for mode, label in (("plain", "nothing"), ("collect", "gc.collect()")):
        print(f"| {label} | {aborts(mode, args.runs, args.script)} of {args.runs} |", flush=True)


if __name__ == "__main__":
    main()
