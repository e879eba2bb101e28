"""Link bandwidths measured on the cluster by mcode-preflight, for the planner in place of the
datasheet's (`mcode-plan --network-from LOG_DIR/preflight.json`).

The preflight reports bus bandwidth (what nccl-tests calls busbw: what each link carries) of the
all-reduce inside each node and of the 2-rank all-reduces between neighbouring nodes, one rail per
GPU. Those are the planner's `link bandwidth x link_efficiency` for the intra- and inter-node
links, so the planner takes measured / link_efficiency as the link: its collectives then run at
the measured rate. The medians over nodes and pairs are used (the slow ones are for excluding)."""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, replace

from megatron_code.errors import ConfigError
from megatron_code.plan.hardware import GpuSpec
from megatron_code.preflight.report import judge


@dataclass(frozen=True)
class MeasuredLinks:
    """Median bus bandwidths of one preflight report, GB/s (None: not measured by that job)."""

    path: str
    intra_node_bus: float | None
    """All-reduce over each node's GPUs (None: one GPU per node)."""
    inter_node_bus: float | None
    """2-rank all-reduce between neighbouring nodes (None: a one-node job)."""
    gpus_per_node: int
    """Ranks per node in the measured job."""


def read_preflight(path: str) -> MeasuredLinks:
    if not os.path.isfile(path):
        raise ConfigError(f"--network-from {path}: no such file; give the preflight.json that "
                          "launch/slurm/preflight.sbatch (mcode-preflight --report) wrote.")
    try:
        with open(path) as fh:
            report = json.load(fh)
        ranks, nodes = report["ranks"], report["nodes"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"--network-from {path}: not a preflight report (mcode-preflight --report): {exc!r}") from None
    try:
        verdict = judge(ranks, nodes, slow_fraction=0.5)  # its per-node and per-pair medians
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"--network-from {path}: not a preflight report (mcode-preflight --report): {exc!r}") from None
    if not verdict.node_bus and not verdict.pair_bus:
        raise ConfigError(f"--network-from {path}: the job measured no link ({len(ranks)} rank(s) on "
                          f"{len(nodes)} node(s)); run the preflight on at least two GPUs per node or two nodes.")

    def median(values):
        return statistics.median(values) if values else None
    return MeasuredLinks(path, median(verdict.node_bus.values()), median(verdict.pair_bus.values()),
                         gpus_per_node=max(sum(1 for r in ranks if r["node"] == node) for node in range(len(nodes))))


def with_measured_links(gpu: GpuSpec, links: MeasuredLinks, link_efficiency: float) -> GpuSpec:
    """gpu with the measured links (each as bus bandwidth / link_efficiency) where measured."""
    if links.gpus_per_node != gpu.gpus_per_node:
        raise ConfigError(f"--network-from {links.path}: measured with {links.gpus_per_node} GPUs per node, but "
                          f"the planner's {gpu.name} nodes hold {gpu.gpus_per_node}; measure a job laid out as "
                          "the one to plan.")
    changes = {"links_note": describe(links)}
    if links.intra_node_bus is not None:
        changes["intra_node_gb_per_s"] = links.intra_node_bus / link_efficiency
    if links.inter_node_bus is not None:
        changes["inter_node_gb_per_s"] = links.inter_node_bus / link_efficiency
    return replace(gpu, **changes)


def describe(links: MeasuredLinks) -> str:
    """The header's note on where the link bandwidths come from."""
    parts = [f"{name} {value:.0f} GB/s bus" for name, value in
             (("intra-node", links.intra_node_bus), ("inter-node", links.inter_node_bus)) if value is not None]
    missing = [name for name, value in (("intra-node", links.intra_node_bus), ("inter-node", links.inter_node_bus))
               if value is None]
    return (f"links measured by preflight ({links.path}): {', '.join(parts)}"
            + (f"; {', '.join(missing)} from the datasheet" if missing else ""))
