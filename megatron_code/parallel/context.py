"""Context parallelism: the sequence of every sample is split over CP ranks, each rank runs the
whole network on its tokens, and attention gathers keys and values from all CP ranks.

Causal load balancing (as in Megatron/Transformer Engine): the sequence is cut into 2 x CP
chunks and rank r holds chunks r and 2CP-1-r, so every rank has the same amount of causal
attention work (an early chunk attends to little, its partner late chunk to almost everything).

Attention is "all-gather KV": after RoPE, K and V of all ranks are all-gathered (backward:
reduce-scatter of their gradients) and each rank attends with its own queries. The KV memory of
the full sequence is held once per layer; a ring (point-to-point, overlapped) variant is the
upgrade path for very long sequences. Position ids travel with the tokens, so RoPE is exact.

Without document masks each local chunk is one causal attention over the keys up to its end,
aligned bottom-right (`LocalChunks`): no mask is built, and the fused kernels run as at CP = 1.
With document masks the queries see an explicit [s/cp, s] mask (`context_parallel_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from megatron_code.parallel.mappings import _GatherSP


@lru_cache(maxsize=64)
def _local_indices_cpu(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    chunk = seq_len // (2 * cp)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    mirror = 2 * cp - 1 - cp_rank
    second = torch.arange(mirror * chunk, (mirror + 1) * chunk)
    return torch.cat((first, second))


def local_token_indices(seq_len: int, cp: int, cp_rank: int, device) -> torch.Tensor:
    """Global positions (in the full sequence) of the tokens CP rank `cp_rank` holds, in order."""
    return _local_indices_cpu(seq_len, cp, cp_rank).to(device)


@dataclass(frozen=True)
class LocalChunks:
    """Where this CP rank's s/cp tokens sit in the full sequence: chunk `first` then chunk
    `second` (r and 2CP-1-r), `length` tokens each; `indices` [s/cp] are their global positions."""

    first: int
    second: int
    length: int
    indices: torch.Tensor

    def key_ends(self) -> tuple[int, int]:
        """How many keys (from position 0) each chunk's queries may see: up to its own end."""
        return (self.first + 1) * self.length, (self.second + 1) * self.length


def local_chunks(seq_len: int, cp: int, cp_rank: int, device) -> LocalChunks:
    return LocalChunks(cp_rank, 2 * cp - 1 - cp_rank, seq_len // (2 * cp),
                       local_token_indices(seq_len, cp, cp_rank, device))


@lru_cache(maxsize=64)
def _natural_order_cpu(seq_len: int, cp: int) -> torch.Tensor:
    """Where each global position sits in the rank-ordered all-gather output."""
    gathered = torch.cat([_local_indices_cpu(seq_len, cp, r) for r in range(cp)])
    return torch.argsort(gathered)


def gather_sequence(x: torch.Tensor, cp: int, group) -> torch.Tensor:
    """[s/cp, b, ...] on each rank -> [s, b, ...] in natural sequence order (differentiable)."""
    gathered = _GatherSP.apply(x, group)  # rank-major: [rank 0's chunks, rank 1's chunks, ...]
    order = _natural_order_cpu(gathered.shape[0], cp).to(x.device)
    return gathered.index_select(0, order)


def slice_local(tensor: torch.Tensor, cp: int, cp_rank: int) -> torch.Tensor:
    """[b, s, ...] -> [b, s/cp, ...]: this rank's tokens."""
    return tensor.index_select(1, local_token_indices(tensor.shape[1], cp, cp_rank, tensor.device))


def context_parallel_mask(query_index: torch.Tensor, seq_len: int, segment_ids: torch.Tensor | None):
    """Which keys each local query may see: [1 or b, 1, s/cp, s] bool. Causal in global positions,
    and within the query's own document when segment_ids ([b, s], full sequence) is given."""
    keys = torch.arange(seq_len, device=query_index.device)
    allowed = (query_index[:, None] >= keys[None, :])[None, None]  # [1, 1, s/cp, s]
    if segment_ids is not None:
        query_segment = segment_ids.index_select(1, query_index)  # [b, s/cp]
        allowed = allowed & (query_segment[:, :, None] == segment_ids[:, None, :])[:, None]
    return allowed
