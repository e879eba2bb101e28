"""The measurements: a GEMM on each rank, and all-reduces over groups of ranks, timed on the
device's own clock (CUDA events; the host clock on CPU)."""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist


def timed(device: torch.device, work: Callable[[], None]) -> float:
    """Seconds that `work`'s device work takes (everything queued before it has finished first)."""
    if device.type != "cuda":
        start = time.perf_counter()
        work()
        return time.perf_counter() - start
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    work()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def gemm_tflops(device: torch.device, dtype: torch.dtype, size: int, iters: int) -> float:
    """TFLOP/s of `iters` square [size, size] x [size, size] matrix products on this rank."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b, out = torch.randn_like(a), torch.empty_like(a)

    def products():
        for _ in range(iters):
            torch.mm(a, b, out=out)
    products()  # warmup: kernel selection, clocks up
    return 2 * size**3 * iters / timed(device, products) / 1e12


def all_reduce_bus_gbps(group, size: int, numel: int, dtype: torch.dtype, device: torch.device,
                        iters: int) -> float:
    """Bus bandwidth (GB/s) of an all-reduce of `numel` elements over `group` of `size` ranks:
    bytes x 2 (size - 1) / size per all-reduce time, the figure nccl-tests reports, which for a
    ring is what each link carries."""
    buffer = torch.zeros(numel, dtype=dtype, device=device)

    def reduces():
        for _ in range(iters):
            dist.all_reduce(buffer, group=group)
    reduces()  # warmup: communicator setup, and every member has arrived
    seconds = timed(device, reduces) / iters
    return buffer.numel() * buffer.element_size() * 2 * (size - 1) / size / seconds / 1e9


def pair_rounds(node_count: int) -> int:
    """Rounds of neighbour pairs: none for one node, one for two (a single pair), else two."""
    return 0 if node_count < 2 else 1 if node_count == 2 else 2


def node_pairs(node_count: int, round_index: int) -> list[tuple[int, int]]:
    """Neighbouring nodes paired for one round of pair tests: round 0 pairs (0, 1), (2, 3), ...;
    round 1 shifts by one, (1, 2), (3, 4), ..., closing the ring with (last, 0) when the count is
    even, so every node meets two different neighbours and a slow node shows in both of its pairs
    while its partners are fast in their other pair."""
    pairs = [(i, i + 1) for i in range(round_index, node_count - 1, 2)]
    if round_index == 1 and node_count % 2 == 0 and node_count > 2:
        pairs.append((node_count - 1, 0))
    return pairs


def pair_groups(node_ranks: list[list[int]], round_index: int) -> list[tuple[int, int, list[int]]]:
    """(node a, node b, [rank on a, rank on b]) for each pair of the round and each local index:
    the same local rank on both nodes, so each GPU's own network adapter (rail) is used."""
    groups = []
    for a, b in node_pairs(len(node_ranks), round_index):
        for local in range(min(len(node_ranks[a]), len(node_ranks[b]))):
            groups.append((a, b, [node_ranks[a][local], node_ranks[b][local]]))
    return groups
