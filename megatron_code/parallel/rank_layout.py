"""Where every global rank sits: its node, local rank and mesh coordinates, and the process groups
the mesh forms. Read from `rank_grid`, the same grid build_parallel_state hands to the device
mesh, so the printout cannot drift from what a real run builds; nothing here starts a process."""
from __future__ import annotations

import numpy as np
import torch

from megatron_code.parallel.state import MESH_DIM_NAMES

# What each group's collectives carry, for the summary.
_GROUP_TRAFFIC = {
    "tp": "tensor-parallel all-reduce / all-gather / reduce-scatter in every layer",
    "cp": "K/V all-gather in every attention layer",
    "dp": "gradient reduction (reduce-scatter + all-gather with the distributed optimizer)",
    "dp_cp": "gradient reduction and ZeRO-1 shards over data x context parallel",
    "pp": "activations between pipeline stages (point-to-point)",
}


def rank_coordinates(grid: torch.Tensor) -> list[tuple[int, tuple[int, ...]]]:
    """(global rank, (pp, dp, cp, tp)) for every rank, in rank order."""
    ranks = grid.numpy()
    return sorted((int(ranks[index]), tuple(int(i) for i in index)) for index in np.ndindex(ranks.shape))


def process_groups(grid: torch.Tensor) -> dict[str, np.ndarray]:
    """Each mesh dimension's groups as rows of global ranks (plus dp_cp, the flattened data x
    context group, when CP > 1)."""
    ranks = grid.numpy()
    groups = {}
    for axis, name in reversed(list(enumerate(MESH_DIM_NAMES))):  # innermost (tp) first
        groups[name] = np.moveaxis(ranks, axis, -1).reshape(-1, ranks.shape[axis])
    dp_axis, cp_axis = MESH_DIM_NAMES.index("dp"), MESH_DIM_NAMES.index("cp")
    if ranks.shape[cp_axis] > 1:
        moved = np.moveaxis(ranks, (dp_axis, cp_axis), (-2, -1))
        groups["dp_cp"] = moved.reshape(-1, ranks.shape[dp_axis] * ranks.shape[cp_axis])
    return groups


def format_rank_table(grid: torch.Tensor, nproc_per_node: int) -> list[str]:
    """One line per global rank: node, local rank and mesh coordinates."""
    header = f"{'rank':>6} {'node':>5} {'local':>5} " + " ".join(f"{name:>4}" for name in MESH_DIM_NAMES)
    lines = [header]
    for rank, coords in rank_coordinates(grid):
        node, local = divmod(rank, nproc_per_node)
        lines.append(f"{rank:>6} {node:>5} {local:>5} " + " ".join(f"{c:>4}" for c in coords))
    return lines


def _format_ranks(ranks: np.ndarray) -> str:
    values = [int(r) for r in ranks]
    if len(values) <= 8:
        return "[" + ", ".join(map(str, values)) + "]"
    steps = set(np.diff(values).tolist())
    stride = f", stride {steps.pop()}" if len(steps) == 1 else ""
    return f"[{values[0]}, {values[1]}, {values[2]}, ..., {values[-1]}] ({len(values)} ranks{stride})"


def _node_span(groups: np.ndarray, nproc_per_node: int) -> str:
    widest = max(len(set((group // nproc_per_node).tolist())) for group in groups)
    return "each within one node" if widest == 1 else f"each spans {widest} nodes"


def format_groups(grid: torch.Tensor, nproc_per_node: int) -> list[str]:
    """One line per group kind: how many, how big, the first and last, node span, traffic."""
    lines = []
    for name, groups in process_groups(grid).items():
        count, size = groups.shape
        if size == 1:
            lines.append(f"{name:<6} size 1: no communication")
            continue
        lines.append(
            f"{name:<6} {count} groups of {size}, {_node_span(groups, nproc_per_node)}: first "
            f"{_format_ranks(groups[0])}, last {_format_ranks(groups[-1])}; carries {_GROUP_TRAFFIC[name]}"
        )
    return lines
