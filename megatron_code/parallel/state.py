"""The parallel layout of a run and the process groups that implement it.

Ranks are laid out in Megatron-LM's order, tensor-parallel fastest:

    global_rank = ((pp_rank * DP + dp_rank) * CP + cp_rank) * TP + tp_rank

so the TP group of a rank is TP consecutive ranks (one NVLink island on an 8-GPU node when
TP <= 8), CP groups come next, DP groups stride over TP x CP, and PP stages are the outermost
blocks. A DeviceMesh with dims ("pp", "dp", "cp", "tp") owns the groups; the object is passed
explicitly to every layer that communicates (no global state).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_code.errors import ConfigError


@dataclass
class ParallelConfig:
    """How the run is split over processes; the data-parallel size is what remains of the world."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size: attention heads, MLP columns and the vocabulary are split over this many ranks."""
    sequence_parallel: bool = False
    """With TP > 1, also split the sequence outside attention/MLP (norms, dropout, residual) over the TP ranks."""


@dataclass
class ParallelState:
    """Sizes, this rank's coordinates and the process groups, built once per run."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    mesh: DeviceMesh | None = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def group(self, dim: str):
        """Process group of one mesh dimension ("tp", "cp", "dp", "pp"); None in a 1-process run."""
        return self.mesh[dim].get_group() if self.mesh is not None else None

    def rank(self, dim: str) -> int:
        return self.mesh[dim].get_local_rank() if self.mesh is not None else 0

    @property
    def tp_group(self):
        return self.group("tp")

    @property
    def tp_rank(self) -> int:
        return self.rank("tp")

    @property
    def dp_group(self):
        return self.group("dp")

    @property
    def dp_rank(self) -> int:
        return self.rank("dp")


def validate_layout(config: ParallelConfig, world_size: int, num_attention_heads: int,
                    num_kv_heads: int, hidden_dropout: float, attention_dropout: float) -> int:
    """Check the layout against the world and the model; return the data-parallel size."""
    tp = config.tensor_model_parallel_size
    if tp < 1 or world_size % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} must divide the number of processes ({world_size})."
        )
    if num_attention_heads % tp:
        raise ConfigError(
            f"--num-attention-heads ({num_attention_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})."
        )
    if num_kv_heads % tp:
        # Megatron replicates KV heads when TP > groups; we keep whole groups per rank instead,
        # which makes the fused QKV split a plain contiguous chunk (see docs/parallelism.md).
        raise ConfigError(
            f"the number of KV heads ({num_kv_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp}): each TP rank holds whole GQA groups."
        )
    if config.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1.")
    if tp > 1 and (hidden_dropout or attention_dropout):
        raise ConfigError(
            "dropout with tensor parallelism needs per-rank RNG streams, which are not implemented; "
            "use --hidden-dropout 0 --attention-dropout 0 (Llama-style pretraining uses none)."
        )
    return world_size // tp


def build_parallel_state(config: ParallelConfig, device: torch.device) -> ParallelState:
    """Create the device mesh over all ranks (collective: every rank calls it)."""
    world_size = dist.get_world_size()
    tp = config.tensor_model_parallel_size
    pp, cp = 1, 1
    dp = world_size // (tp * pp * cp)
    mesh = init_device_mesh(device.type, (pp, dp, cp, tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
    return ParallelState(tp=tp, pp=pp, cp=cp, dp=dp, sequence_parallel=config.sequence_parallel, mesh=mesh)
