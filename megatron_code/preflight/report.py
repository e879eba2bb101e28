"""What the gathered measurements say: the job's medians, the GPUs and nodes below
`slow_fraction` of them, and the nodes to exclude. Every rank computes the same verdict from the
same gathered results, so all of them exit with the same status."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Finding:
    node: int
    what: str
    """One line: the measurement, its value and its share of the job's median."""


@dataclass
class Verdict:
    node_names: list[str]
    gemm: dict[int, float]
    """rank -> GEMM TFLOP/s."""
    node_bus: dict[int, float] = field(default_factory=dict)
    """node -> bus GB/s of the all-reduce inside it (the median over its ranks)."""
    pair_bus: dict[tuple[int, int, int], float] = field(default_factory=dict)
    """(round, node a, node b) -> bus GB/s of the 2-rank all-reduces between them (the median over rails)."""
    world_bus: float | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def slow_nodes(self) -> list[str]:
        return [self.node_names[n] for n in sorted({f.node for f in self.findings})]


def _share(value: float, median: float) -> str:
    return f"{100 * value / median:.3g}% of the median" if median > 0 else "median 0"


def judge(results: list[dict], node_names: list[str], slow_fraction: float) -> Verdict:
    """results[rank]: {"node", "gemm_tflops", "node_bus_gbps" (None alone on its node),
    "world_bus_gbps", "pairs": [{"round", "nodes": [a, b], "bus_gbps"}]}."""
    verdict = Verdict(node_names, {rank: r["gemm_tflops"] for rank, r in enumerate(results)},
                      world_bus=statistics.median(r["world_bus_gbps"] for r in results)
                      if len(results) > 1 else None)
    median = statistics.median(verdict.gemm.values())
    for rank, tflops in verdict.gemm.items():
        if tflops < slow_fraction * median:
            verdict.findings.append(Finding(results[rank]["node"], f"rank {rank}: GEMM {tflops:.3g} TFLOP/s "
                                                                   f"({_share(tflops, median)})"))
    by_node: dict[int, list[float]] = {}
    by_pair: dict[tuple[int, int, int], list[float]] = {}
    for r in results:
        if r["node_bus_gbps"] is not None:
            by_node.setdefault(r["node"], []).append(r["node_bus_gbps"])
        for pair in r["pairs"]:
            by_pair.setdefault((pair["round"], *pair["nodes"]), []).append(pair["bus_gbps"])
    verdict.node_bus = {node: statistics.median(values) for node, values in by_node.items()}
    verdict.pair_bus = {key: statistics.median(values) for key, values in by_pair.items()}
    _judge_nodes(verdict, slow_fraction)
    _judge_links(verdict, slow_fraction)
    return verdict


def _judge_nodes(verdict: Verdict, slow_fraction: float) -> None:
    """A node whose own all-reduce (NVLink / PCIe inside it) is slow next to the other nodes'."""
    if len(verdict.node_bus) < 2:
        return
    median = statistics.median(verdict.node_bus.values())
    for node, gbps in sorted(verdict.node_bus.items()):
        if gbps < slow_fraction * median:
            verdict.findings.append(Finding(node, f"all-reduce inside the node {gbps:.3g} GB/s ({_share(gbps, median)})"))


def _judge_links(verdict: Verdict, slow_fraction: float) -> None:
    """A node whose every pair with a neighbour is slow: its network, not the neighbours' (each
    neighbour is fast in its other pair). With a single pair in the job nothing is compared."""
    if len(verdict.pair_bus) < 2:
        return
    median = statistics.median(verdict.pair_bus.values())
    slow = {key for key, gbps in verdict.pair_bus.items() if gbps < slow_fraction * median}
    for node in range(len(verdict.node_names)):
        pairs = [key for key in verdict.pair_bus if node in key[1:]]
        if pairs and all(key in slow for key in pairs):
            values = ", ".join(f"{verdict.pair_bus[key]:.3g} with {verdict.node_names[key[2] if key[1] == node else key[1]]}"
                               for key in pairs)
            verdict.findings.append(Finding(node, f"all-reduce to neighbour nodes {values} GB/s "
                                                  f"(median of all pairs {median:.3g})"))


def _spread(values: dict, name) -> str:
    low, high = min(values, key=values.get), max(values, key=values.get)
    return (f"median {statistics.median(values.values()):.3g} | min {values[low]:.3g} ({name(low)}) | "
            f"max {values[high]:.3g} ({name(high)})")


def format_verdict(verdict: Verdict, results: list[dict], slow_fraction: float) -> str:
    def rank_name(rank):
        return f"rank {rank} on {verdict.node_names[results[rank]['node']]}"

    lines = [f"GEMM TFLOP/s per rank:           {_spread(verdict.gemm, rank_name)}"]
    if verdict.world_bus is not None:
        lines.append(f"all-reduce bus GB/s, all ranks: {verdict.world_bus:.3g}")
    if verdict.node_bus:
        lines.append(f"all-reduce bus GB/s, per node:  {_spread(verdict.node_bus, verdict.node_names.__getitem__)}")
    if verdict.pair_bus:
        lines.append(f"all-reduce bus GB/s, node pairs: {_spread(verdict.pair_bus, lambda key: '-'.join(verdict.node_names[n] for n in key[1:]))}")
    if not verdict.findings:
        lines.append(f"verdict: no GPU or node below {100 * slow_fraction:.0f}% of the job's median")
        return "\n".join(lines)
    lines.append(f"SLOW (below {100 * slow_fraction:.0f}% of the job's median):")
    lines += [f"  {verdict.node_names[f.node]}: {f.what}" for f in verdict.findings]
    lines.append(f"verdict: {len(verdict.slow_nodes)} slow node(s); resubmit without them: "
                 f"sbatch --exclude={','.join(verdict.slow_nodes)} ...")
    return "\n".join(lines)
