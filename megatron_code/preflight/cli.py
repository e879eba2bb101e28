"""`python -m megatron_code.preflight` / `mcode-preflight`, on every rank of the job (torchrun;
launch/slurm/preflight.sbatch). Exit status: 0 nothing slow, 3 slow GPUs or nodes found (named,
with an --exclude list), 2 bad flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys

import torch
import torch.distributed as dist

from megatron_code.config_docs import field_docs
from megatron_code.distributed import destroy_distributed, init_distributed
from megatron_code.preflight.measure import all_reduce_bus_gbps, gemm_tflops, pair_groups, pair_rounds
from megatron_code.preflight.report import format_verdict, judge

SLOW_FOUND = 3


@dataclasses.dataclass
class PreflightConfig:
    """What the preflight measures, and what counts as slow."""

    gemm_size: int | None = None
    """Side of the square matrices each rank multiplies (default 8192 in bf16 on a GPU, 512 in fp32 on a CPU)."""
    gemm_iters: int | None = None
    """Timed matrix products per rank (default 500 on a GPU, about a second on an H100; some
    10,000 load the GPUs long enough for thermal throttling to show; 20 on a CPU)."""
    all_reduce_mib: float | None = None
    """MiB each all-reduce carries (default 256 on GPUs: bandwidth-bound; 4 on CPUs)."""
    all_reduce_iters: int = 10
    """Timed all-reduces per group."""
    slow_fraction: float = 0.9
    """A GPU, node or link is slow below this fraction of the job's median."""
    report: str | None = None
    """Also write every rank's measurements and the verdict as JSON here."""
    dry_run: bool = False
    """Print what would be measured on the job's layout; start nothing."""
    world_size: int | None = None
    """Ranks in the job (for --dry-run; launch/torchrun.sh passes it)."""
    nproc_per_node: int | None = None
    """Ranks per node (for --dry-run; launch/torchrun.sh passes it)."""


def parse_args(argv: list[str] | None) -> PreflightConfig:
    parser = argparse.ArgumentParser(prog="mcode-preflight", description=__doc__.split("\n\n")[0])
    docs = field_docs(PreflightConfig)
    for f in dataclasses.fields(PreflightConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=docs[f.name])
        else:
            kind = {"int | None": int, "int": int, "float | None": float, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=f.default, help=f"{docs[f.name]} (default: {f.default})")
    cfg = PreflightConfig(**vars(parser.parse_args(argv)))
    for name in ("gemm_size", "gemm_iters", "all_reduce_mib", "all_reduce_iters", "world_size", "nproc_per_node"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if not 0 < cfg.slow_fraction < 1:
        parser.error(f"--slow-fraction must be in (0, 1), got {cfg.slow_fraction}")
    return cfg


def for_device(cfg: PreflightConfig, cuda: bool) -> PreflightConfig:
    """cfg with the sizes left unset given the device's defaults."""
    return dataclasses.replace(cfg, gemm_size=cfg.gemm_size or (8192 if cuda else 512),
                               gemm_iters=cfg.gemm_iters or (500 if cuda else 20),
                               all_reduce_mib=cfg.all_reduce_mib or (256 if cuda else 4))


def plan_lines(cfg: PreflightConfig, world: int, per_node: int, device_type: str, where: str = "") -> list[str]:
    """What the check measures on this layout (where: said after the device type)."""
    nodes = -(-world // per_node)
    cuda = device_type == "cuda"
    cfg = for_device(cfg, cuda)
    size = cfg.gemm_size
    rounds = pair_rounds(nodes)
    return [
        f"preflight: {world} ranks on {nodes} node(s) x {per_node} | {device_type}{where}",
        f"  GEMM: {cfg.gemm_iters} x [{size}, {size}] x [{size}, {size}] "
        f"{'bf16' if cuda else 'fp32'} per rank",
        f"  all-reduce: {cfg.all_reduce_iters} x {cfg.all_reduce_mib:g} MiB over all ranks, inside each node"
        + (f", and between neighbouring nodes ({rounds} round(s), rank by rank)" if rounds else ""),
        f"  slow: below {100 * cfg.slow_fraction:.0f}% of the job's median",
    ]


def _node_layout() -> tuple[list[list[int]], list[str], int]:
    """The ranks of each node, the nodes' names and this rank's node. Nodes are torchrun's agents
    (GROUP_RANK), named by host (with the agent's number where hosts repeat: one host, two agents)."""
    mine = (int(os.environ.get("GROUP_RANK", 0)), socket.gethostname())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    keys = sorted({key for key, _ in everyone})
    hosts = {key: host for key, host in everyone}
    repeated = len(set(hosts.values())) < len(keys)
    names = [f"{hosts[key]}#{key}" if repeated else hosts[key] for key in keys]
    node_ranks = [[r for r, (key, _) in enumerate(everyone) if key == node_key] for node_key in keys]
    return node_ranks, names, keys.index(mine[0])


def measure(cfg: PreflightConfig, device: torch.device) -> tuple[dict, list[str]]:
    """This rank's measurements (each phase starts together on all ranks) and the node names."""
    cuda = device.type == "cuda"
    cfg = for_device(cfg, cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    numel = int(cfg.all_reduce_mib * 2**20) * 8 // torch.finfo(dtype).bits
    rank = dist.get_rank()
    node_ranks, names, node = _node_layout()
    dist.barrier()
    mine = {"rank": rank, "node": node, "host": socket.gethostname(),
            "gemm_tflops": gemm_tflops(device, dtype, cfg.gemm_size, cfg.gemm_iters)}
    dist.barrier()

    def bus(group, size):
        return all_reduce_bus_gbps(group, size, numel, dtype, device, cfg.all_reduce_iters)
    mine["world_bus_gbps"] = bus(None, dist.get_world_size()) if dist.get_world_size() > 1 else None
    own = node_ranks[node]
    node_group = dist.new_group(own, use_local_synchronization=True) if len(own) > 1 else None
    dist.barrier()
    mine["node_bus_gbps"] = bus(node_group, len(own)) if node_group is not None else None
    mine["pairs"] = []
    for round_index in range(pair_rounds(len(node_ranks))):
        dist.barrier()  # one round at a time: pairs of different rounds share nodes
        for a, b, ranks in pair_groups(node_ranks, round_index):
            if rank in ranks:
                group = dist.new_group(ranks, use_local_synchronization=True)
                mine["pairs"].append({"round": round_index, "nodes": [a, b], "bus_gbps": bus(group, 2)})
    return mine, names


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.dry_run:
        world = cfg.world_size or int(os.environ.get("WORLD_SIZE", 1))
        print("\n".join(plan_lines(cfg, world, cfg.nproc_per_node or world, "cuda", " (the job's nodes)")))
        return 0
    env = init_distributed()
    try:
        if env.is_main:
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))
            print("\n".join(plan_lines(cfg, env.world_size, per_node, env.device.type)), flush=True)
        mine, names = measure(cfg, env.device)
        results: list = [None] * env.world_size
        dist.all_gather_object(results, mine)
        verdict = judge(results, names, cfg.slow_fraction)  # the same on every rank
        if env.is_main:
            print(format_verdict(verdict, results, cfg.slow_fraction), flush=True)
            if cfg.report:
                write_report(cfg, names, results, verdict)
        # A rank that exits non-zero makes torchrun stop the others: none leaves before rank 0 has written.
        dist.barrier()
    finally:
        destroy_distributed()
    return SLOW_FOUND if verdict.findings else 0


def write_report(cfg: PreflightConfig, names: list[str], results: list[dict], verdict) -> None:
    with open(cfg.report, "w") as fh:
        json.dump({"config": dataclasses.asdict(cfg), "nodes": names, "ranks": results,
                   "findings": [dataclasses.asdict(f) for f in verdict.findings],
                   "exclude": verdict.slow_nodes}, fh, indent=1)

if __name__ == "__main__":
    sys.exit(main())
