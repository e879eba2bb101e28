"""One candidate parallel layout, its translation to the trainer's configs and flags, and its
validity, decided by the trainer's own checks (validate_layout, check_pipeline, ModelConfig.validate,
check_batch_sizes), so the planner never lists a layout the trainer would refuse."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_code.model.config import ModelConfig
from megatron_code.parallel.pipeline import check_pipeline
from megatron_code.parallel.state import ParallelConfig, validate_layout


@dataclass(frozen=True)
class Layout:
    """How one run is split over GPUs, batched and recomputed."""

    tp: int
    """Tensor-parallel size (sequence parallelism is on whenever tp > 1)."""
    pp: int
    """Pipeline-parallel size."""
    vp: int
    """Virtual stages per pipeline rank (1: plain 1F1B; > 1: interleaved 1F1B)."""
    cp: int
    """Context-parallel size."""
    dp: int
    """Data-parallel size (what remains of the GPUs)."""
    micro_batch_size: int
    """Samples per micro-batch."""
    distributed_optimizer: bool
    """ZeRO-1: Adam state sharded over the DP x CP ranks, run with --overlap-param-gather (the
    updated parameters' all-gather overlaps the next step's first forward; it costs no memory)."""
    recompute_granularity: str | None = None
    """None, "selective" or "full" (ModelConfig's field)."""
    recompute_method: str | None = None
    """With full recompute: "uniform" or "block"."""
    recompute_num_layers: int | None = None
    """With full recompute: layers per group (uniform) or recomputed layers per stage (block)."""
    bf16_params: bool = False
    """--params-dtype bfloat16 (ZeRO-1 under bf16 only): bf16 parameters whose fp32 master weights
    the distributed optimizer keeps sharded with the Adam state (parallel/distributed_optimizer.py)."""

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    @property
    def schedule(self) -> str:
        return "interleaved-1f1b" if self.vp > 1 else "1f1b"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def micro_batches(self, global_batch_size: int) -> int:
        """Micro-batches each pipeline runs per step (the gradient-accumulation count)."""
        return global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def label(self) -> str:
        """The parallel shape in a few characters, e.g. `TP2 PP1 CP1 DP256 mb4 ZeRO-1`."""
        virtual = f" VP{self.vp}" if self.vp > 1 else ""
        zero1 = " ZeRO-1" if self.distributed_optimizer else ""
        return f"TP{self.tp} PP{self.pp}{virtual} CP{self.cp} DP{self.dp} mb{self.micro_batch_size}{zero1}"

    @property
    def recompute_label(self) -> str:
        if self.recompute_granularity != "full":
            return self.recompute_granularity or "none"
        return f"full-{self.recompute_method}-{self.recompute_num_layers}"

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            tensor_model_parallel_size=self.tp, sequence_parallel=self.sequence_parallel,
            context_parallel_size=self.cp, pipeline_model_parallel_size=self.pp,
            pipeline_schedule=self.schedule,
            virtual_pipeline_model_parallel_size=self.vp if self.vp > 1 else None,
            use_distributed_optimizer=self.distributed_optimizer,
            overlap_param_gather=self.distributed_optimizer,
        )

    def model_config(self, base: ModelConfig) -> ModelConfig:
        return base.replace(recompute_granularity=self.recompute_granularity,
                            recompute_method=self.recompute_method, recompute_num_layers=self.recompute_num_layers,
                            params_dtype="bfloat16" if self.bf16_params else base.params_dtype)

    def train_flags(self, global_batch_size: int) -> list[str]:
        """The mcode-train flags that select this layout."""
        flags = ["--tensor-model-parallel-size", str(self.tp)] + (["--sequence-parallel"] if self.tp > 1 else [])
        flags += ["--pipeline-model-parallel-size", str(self.pp)]
        if self.vp > 1:
            flags += ["--pipeline-schedule", self.schedule, "--virtual-pipeline-model-parallel-size", str(self.vp)]
        flags += ["--context-parallel-size", str(self.cp), "--micro-batch-size", str(self.micro_batch_size),
                  "--global-batch-size", str(global_batch_size)]
        flags += ["--use-distributed-optimizer", "--overlap-param-gather"] if self.distributed_optimizer else []
        flags += ["--params-dtype", "bfloat16"] if self.bf16_params else []
        if self.recompute_granularity:
            flags += ["--recompute-granularity", self.recompute_granularity]
        if self.recompute_method:
            flags += ["--recompute-method", self.recompute_method, "--recompute-num-layers", str(self.recompute_num_layers)]
        return flags


def check_layout(layout: Layout, model: ModelConfig, seq_length: int, global_batch_size: int) -> None:
    """Raise ConfigError when the trainer would refuse this layout."""
    from megatron_code.training.config import RunConfig, TrainingConfig
    # validate.py reads datasets through megatron-core; imported here so that the memory and
    # time models stay importable where megatron-core is not installed (GPU calibration hosts).
    from megatron_code.training.validate import check_batch_sizes, check_params_dtype

    config = layout.model_config(model)
    dp = validate_layout(layout.parallel_config(), layout.gpus, config, seq_length)
    run = RunConfig(model=config, parallel=layout.parallel_config(),
                    training=TrainingConfig(micro_batch_size=layout.micro_batch_size,
                                            global_batch_size=global_batch_size, bf16=True))
    check_batch_sizes(run, dp)
    check_params_dtype(run)
    if layout.pp > 1:
        check_pipeline(layout.schedule, layout.pp, layout.vp, config, layout.micro_batches(global_batch_size))
