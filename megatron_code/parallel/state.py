"""The parallel layout of a run and the process groups that implement it.

Ranks are laid out in Megatron-LM's order, tensor-parallel fastest:

    global_rank = ((pp_rank * DP + dp_rank) * CP + cp_rank) * TP + tp_rank

so the TP group of a rank is TP consecutive ranks (one NVLink island on an 8-GPU node when
TP <= 8), CP groups come next, DP groups stride over TP x CP, and PP stages are the outermost
blocks. A DeviceMesh with dims ("pp", "dp", "cp", "tp") owns the groups; the object is passed
explicitly to every layer that communicates (no global state).
"""
from __future__ import annotations

import datetime
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
    context_parallel_size: int = 1
    """Context-parallel size: each sample's sequence is split over this many ranks (causally load-balanced)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size: the layers are cut into this many consecutive groups of stages."""
    pipeline_schedule: str = "1f1b"
    """Pipeline schedule: 1f1b, interleaved-1f1b, zbv (zero-bubble V), dualpipev."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Stages per pipeline rank for interleaved-1f1b (zbv and dualpipev always use 2)."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Alternative to the virtual size: layers per virtual stage (virtual size = layers / (PP x this))."""
    use_distributed_optimizer: bool = False
    """ZeRO-1: shard the AdamW state (and the optimizer step) over the data-parallel ranks; gradients
    are reduce-scattered instead of all-reduced and the updated parameters all-gathered."""
    overlap_param_gather: bool = False
    """With the distributed optimizer: return from the optimizer step with the parameter
    all-gathers in flight; the next forward waits for each bucket just before the layer that
    uses it, so the gathers overlap compute (Megatron's --overlap-param-gather)."""
    ddp_bucket_size: int | None = None
    """Gradient elements per bucket of the data-parallel reduction (all-reduce, or ZeRO-1's
    reduce-scatter and all-gather); a bucket's collective starts as soon as backward has produced
    its gradients. Default: Megatron-LM's max(40M, 1M x DP x CP), large enough that the ring
    collectives over G ranks stay bandwidth-bound (parallel/grads.py default_bucket_elements)."""
    distributed_timeout_minutes: float | None = None
    """How long any collective waits for the other ranks before the job fails, for the world
    group and every parallel group (Megatron's --distributed-timeout-minutes). Default: torch's,
    10 minutes on NCCL (30 on gloo). Raise it where ranks legitimately wait longer, e.g. while rank
    0 builds the dataset indices of a large blend (megatron-core; the others wait at a barrier)."""


@dataclass
class ParallelState:
    """Sizes, this rank's coordinates and the process groups, built once per run."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    mesh: DeviceMesh | None = field(default=None, repr=False)
    flattened: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)
    """Meshes of combined dimensions ("dp_cp", "dp_cp_tp"), kept here: torch deprecates slicing
    them back out of the root mesh."""

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
    def cp_group(self):
        return self.group("cp")

    @property
    def cp_rank(self) -> int:
        return self.rank("cp")

    @property
    def dp_cp_group(self):
        """Ranks that hold the same parameters and different tokens: gradients and loss sums
        are reduced over data-parallel x context-parallel."""
        if self.mesh is None:
            return None
        return self.flattened["dp_cp"].get_group() if self.cp > 1 else self.dp_group

    @property
    def amax_group(self):
        """Ranks whose FP8 amaxes Transformer Engine reduces together: data x context x tensor
        parallel, Megatron-LM's amax-reduction group (built by build_parallel_state when asked
        for); None in a 1-process run."""
        if self.mesh is None:
            return None
        if "dp_cp_tp" not in self.flattened:
            raise RuntimeError("this ParallelState was built without the FP8 amax-reduction group: "
                               "call build_parallel_state(..., fp8_amax_group=True)")
        return self.flattened["dp_cp_tp"].get_group()

    @property
    def dp_rank(self) -> int:
        return self.rank("dp")


def validate_layout(config: ParallelConfig, world_size: int, model, seq_length: int) -> int:
    """Check the layout against the world, the model (a ModelConfig) and the sequence length;
    return the data-parallel size."""
    model.validate()
    tp, cp, pp = config.tensor_model_parallel_size, config.context_parallel_size, config.pipeline_model_parallel_size
    num_attention_heads, num_kv_heads = model.num_attention_heads, model.num_kv_heads
    sizes = {"--tensor-model-parallel-size": tp, "--context-parallel-size": cp, "--pipeline-model-parallel-size": pp,
             "--virtual-pipeline-model-parallel-size": config.virtual_pipeline_model_parallel_size,
             "--num-layers-per-virtual-pipeline-stage": config.num_layers_per_virtual_pipeline_stage}
    for flag, size in sizes.items():
        if size is not None and size < 1:  # 0 is not "off": leave the flag out, or give 1
            raise ConfigError(f"{flag} must be >= 1, got {size}.")
    if world_size % (tp * cp * pp):
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} x --context-parallel-size {cp} x "
            f"--pipeline-model-parallel-size {pp} must divide the number of processes ({world_size})."
        )
    _check_context_parallel(cp, tp, config.sequence_parallel, seq_length, model.attention_backend)
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
    if (tp > 1 or cp > 1) and (model.hidden_dropout or model.attention_dropout):
        raise ConfigError(
            "dropout with tensor parallelism needs per-rank RNG streams, which are not implemented; "
            "use --hidden-dropout 0 --attention-dropout 0 (Llama-style pretraining uses none)."
        )
    return world_size // (tp * cp * pp)


def virtual_stages(config: ParallelConfig, num_layers: int) -> int:
    """Stages per pipeline rank (1 without virtual stages)."""
    if config.pipeline_schedule in ("zbv", "dualpipev"):
        return 2
    if config.num_layers_per_virtual_pipeline_stage:
        per_rank = num_layers // config.pipeline_model_parallel_size
        if per_rank % config.num_layers_per_virtual_pipeline_stage:
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage ({config.num_layers_per_virtual_pipeline_stage}) "
                f"must divide the layers per pipeline rank ({per_rank})."
            )
        return per_rank // config.num_layers_per_virtual_pipeline_stage
    return config.virtual_pipeline_model_parallel_size or 1


def _check_context_parallel(cp: int, tp: int, sequence_parallel: bool, seq_length: int, backend: str) -> None:
    if cp == 1:
        return
    if seq_length % (2 * cp):
        raise ConfigError(
            f"--seq-length ({seq_length}) must be divisible by 2 x --context-parallel-size ({2 * cp}): "
            "each CP rank holds two equal chunks (causal load balancing)."
        )
    if sequence_parallel and (seq_length // cp) % tp:
        raise ConfigError(
            f"with sequence parallelism, --seq-length / --context-parallel-size ({seq_length // cp}) "
            f"must be divisible by --tensor-model-parallel-size ({tp})."
        )
    if backend not in ("sdpa", "flash"):
        raise ConfigError(
            f"--context-parallel-size > 1 runs with --attention-backend sdpa or flash (got {backend}); "
            "Transformer Engine's own context parallelism is not wired in."
        )


MESH_DIM_NAMES = ("pp", "dp", "cp", "tp")
"""The device mesh's dimensions, outermost first: consecutive ranks differ in tp."""


def rank_grid(config: ParallelConfig, world_size: int) -> torch.Tensor:
    """Global ranks indexed by mesh coordinates [pp, dp, cp, tp]: the mesh build_parallel_state
    creates (init_device_mesh numbers ranks row-major over this shape). The dry run reads
    coordinates and groups from it without starting any process group."""
    tp, cp, pp = config.tensor_model_parallel_size, config.context_parallel_size, config.pipeline_model_parallel_size
    return torch.arange(world_size).reshape(pp, world_size // (tp * pp * cp), cp, tp)


def build_parallel_state(config: ParallelConfig, device: torch.device, fp8_amax_group: bool = False) -> ParallelState:
    """Create the device mesh over all ranks (collective: every rank calls it); with
    fp8_amax_group, also the data x context x tensor-parallel group (ParallelState.amax_group)."""
    pp, dp, cp, tp = rank_grid(config, dist.get_world_size()).shape
    options = group_options(device, config.distributed_timeout_minutes)
    overrides = None if options is None else dict.fromkeys(MESH_DIM_NAMES, options)
    mesh = init_device_mesh(device.type, (pp, dp, cp, tp), mesh_dim_names=MESH_DIM_NAMES, backend_override=overrides)
    flattened = {}
    if cp > 1:
        flattened["dp_cp"] = mesh["dp", "cp"]._flatten("dp_cp", backend_override=options)
    if fp8_amax_group:
        flattened["dp_cp_tp"] = mesh["dp", "cp", "tp"]._flatten("dp_cp_tp", backend_override=options)
    return ParallelState(tp=tp, pp=pp, cp=cp, dp=dp, sequence_parallel=config.sequence_parallel, mesh=mesh,
                         flattened=flattened)


def distributed_timeout(minutes: float | None) -> datetime.timedelta | None:
    """--distributed-timeout-minutes as what torch.distributed takes (None: torch's default)."""
    if minutes is None:
        return None
    if minutes <= 0:
        raise ConfigError(f"--distributed-timeout-minutes must be > 0, got {minutes}.")
    return datetime.timedelta(minutes=minutes)


def group_options(device: torch.device, minutes: float | None):
    """Backend options carrying the timeout, for the mesh's groups (None: torch's defaults, and
    a mesh dimension spanning the world reuses the world group). NCCL takes only its own options
    class; DeviceMesh reads the timeout back from either."""
    timeout = distributed_timeout(minutes)
    if timeout is None:
        return None
    if device.type == "cuda":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return options
    return dist.ProcessGroupGloo.Options("gloo", timeout)
