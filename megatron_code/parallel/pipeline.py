"""Pipeline parallelism with torch.distributed.pipelining (ARCHITECTURE.md, decision 3).

The model is cut into PP x VP stages of consecutive layers. Each PP rank builds only its stages
(GPTModel chunks holding global layer indices, so parameter names and checkpoints are those of
the whole model); the first stage owns the embedding, the last the final norm, output layer and
loss. Stages exchange (hidden [s, b, h], position_ids, segment_ids): every stage needs the
positions for RoPE and the segment ids for document masks.

Stage placement per schedule: `1f1b` one stage per rank; `interleaved-1f1b` VP stages per rank,
round robin (rank r holds r, r + PP, ...); `zbv` and `dualpipev` two stages per rank in a V
(rank r holds r and 2 PP - 1 - r), so the first and last stage share rank 0.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage, Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B, ScheduleZBVZeroBubble,
)

from megatron_code.errors import ConfigError
from megatron_code.model import GPTModel
from megatron_code.model.config import ModelConfig
from megatron_code.parallel.pipeline_eval import forward_in_stage_order
from megatron_code.parallel.state import ParallelState

SCHEDULES = {
    "1f1b": Schedule1F1B,
    "interleaved-1f1b": ScheduleInterleaved1F1B,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
V_SHAPED = ("zbv", "dualpipev")
# Schedules whose backward is plain autograd (input and weight gradients in one pass); the
# zero-bubble ones compute weight gradients in a separate pass.
WEIGHT_GRADS_THROUGH_AUTOGRAD = ("1f1b", "interleaved-1f1b")
IGNORE_LABEL = -1


def stages_per_rank(schedule: str, virtual_size: int | None) -> int:
    return 2 if schedule in V_SHAPED else (virtual_size or 1)


def local_stage_ids(schedule: str, pp: int, vp: int, pp_rank: int) -> list[int]:
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(vp)]


def check_pipeline(schedule: str, pp: int, vp: int, model: ModelConfig, micro_batches: int) -> None:
    """Layout checks that need the model and batch (one clear error each)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"--pipeline-schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}.")
    if schedule not in WEIGHT_GRADS_THROUGH_AUTOGRAD and model.fp8_format and model.fp8_backend == "te":
        # Their separate weight pass would rerun TE's backward, which updates its FP8 scales.
        raise ConfigError(f"--pipeline-schedule {schedule} computes weight gradients in a separate pass, "
                          "which Transformer Engine's layers do not support: use 1f1b or interleaved-1f1b, "
                          "or --fp8-backend torch.")
    if schedule == "1f1b" and vp > 1:
        raise ConfigError("virtual pipeline stages need --pipeline-schedule interleaved-1f1b (or zbv/dualpipev).")
    if model.num_layers % (pp * vp):
        raise ConfigError(
            f"--num-layers ({model.num_layers}) must be divisible by pipeline stages x virtual stages ({pp} x {vp})."
        )
    if not model.untie_embeddings_and_output_weights:
        raise ConfigError(
            "pipeline parallelism needs --untie-embeddings-and-output-weights: the embedding lives on "
            "the first stage and the output layer on the last."
        )
    if schedule in ("1f1b", "dualpipev") and micro_batches < pp * vp:
        raise ConfigError(
            f"--pipeline-schedule {schedule} needs at least as many micro-batches per step as stages: "
            f"{micro_batches} (global batch / (micro batch x DP)) < {pp * vp}. Raise --global-batch-size."
        )
    # torch's interleaved schedule runs max(1, n // PP) rounds and needs n to be a multiple of them.
    if schedule == "interleaved-1f1b" and micro_batches % max(1, micro_batches // pp):
        raise ConfigError(f"--pipeline-schedule {schedule}: micro-batches per step ({micro_batches}) "
                          f"must be a multiple of {max(1, micro_batches // pp)}.")


def build_stage_models(config: ModelConfig, parallel: ParallelState, init_seed: int, schedule: str,
                       vp: int) -> list[GPTModel]:
    """This PP rank's stages as GPTModel chunks, in the order the schedule expects."""
    num_stages = parallel.pp * vp
    per_stage = config.num_layers // num_stages
    if schedule not in WEIGHT_GRADS_THROUGH_AUTOGRAD:  # they run each weight's backward apart (fused_wgrad.py)
        config = config.replace(gradient_accumulation_fusion=False)
    chunks = []
    for stage in local_stage_ids(schedule, parallel.pp, vp, parallel.rank("pp")):
        layers = range(stage * per_stage, (stage + 1) * per_stage)
        chunks.append(GPTModel(config, parallel, init_seed, layer_indices=layers,
                               pre_process=stage == 0, post_process=stage == num_stages - 1))
    return chunks


class ModelChunks(nn.Module):
    """The stages one rank holds, seen as one model: parameters keep their global names."""

    def __init__(self, chunks: list[GPTModel]):
        super().__init__()
        self.chunks = nn.ModuleList(chunks)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for chunk in self.chunks:
            yield from chunk.named_parameters(prefix, recurse, remove_duplicate)

    def context_parallel_slice(self, per_token: torch.Tensor) -> torch.Tensor:
        return self.chunks[0].context_parallel_slice(per_token)


class _StageModule(nn.Module):
    """Adapts a GPTModel chunk to the pipelining protocol (tensors in, tensors out)."""

    def __init__(self, model: GPTModel, use_segments: bool, bf16: bool):
        super().__init__()
        self.model, self.use_segments, self.bf16 = model, use_segments, bf16

    def forward(self, first, position_ids, segment_ids):
        # The schedule calls this outside the trainer's autocast region, so --bf16 applies here.
        with torch.autocast(first.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self._forward(first, position_ids, segment_ids)

    def _forward(self, first, position_ids, segment_ids):
        m = self.model
        if m.pre_process:  # first: tokens [b, s] of whole samples
            position_ids = m.context_parallel_slice(position_ids)
            first = m.embedding(m.context_parallel_slice(first))
        hidden = m.run_layers(first, position_ids, segment_ids if self.use_segments else None)
        if m.post_process:
            return hidden  # normalized [s(/tp), b, h]: the loss function applies the output layer
        return hidden, position_ids, segment_ids


def stage_example_args(stage: int, num_stages: int, config: ModelConfig, parallel: ParallelState,
                       micro_batch_size: int, seq_length: int, bf16: bool) -> tuple[tuple, tuple]:
    """(inputs, outputs) of one stage as meta tensors: the shapes and dtypes the stages exchange,
    given to PipelineStage up front (its static mode). Without them torch.distributed.pipelining
    infers them at the first step by running every stage's forward and backward on empty tensors,
    whose side effects are real: the fused weight-gradient path writes into weight.grad (NaN
    gradients under --bf16, found 2026-11-27) and FP8 layers record those tensors' amaxes."""
    mb, local = micro_batch_size, seq_length // parallel.cp  # this CP rank's tokens of each sample
    tokens_of_rank = local // parallel.tp if parallel.sequence_parallel else local
    compute = torch.bfloat16 if bf16 else torch.float32
    residual = torch.float32 if config.fp32_residual_connection else compute

    def meta(*shape, dtype=torch.int64, grad=False):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)
    samples = meta(mb, seq_length)  # tokens, position ids, segment ids: [b, s] of whole samples
    handed_on = (meta(tokens_of_rank, mb, config.hidden_size, dtype=residual, grad=True),  # [s, b, h]
                 meta(mb, local), samples)  # positions sliced for CP by the first stage
    inputs = (samples, samples, samples) if stage == 0 else handed_on
    last = (meta(tokens_of_rank, mb, config.hidden_size, dtype=compute, grad=True),)  # final norm's output
    return inputs, (last if stage == num_stages - 1 else handed_on)


class PipelineRunner:
    """Runs one step (forward + backward of all micro-batches) through the schedule."""

    def __init__(self, chunks: list[GPTModel], parallel: ParallelState, schedule: str, vp: int,
                 micro_batches: int, device: torch.device, use_segments: bool, bf16: bool,
                 micro_batch_size: int, seq_length: int):
        num_stages = parallel.pp * vp
        stage_ids = local_stage_ids(schedule, parallel.pp, vp, parallel.rank("pp"))
        self.owners = [0] * num_stages  # stage index -> the PP rank that holds it
        for rank in range(parallel.pp):
            for sid in local_stage_ids(schedule, parallel.pp, vp, rank):
                self.owners[sid] = rank
        self.micro_batches, self.v_shaped = micro_batches, schedule in V_SHAPED
        self.stages = []
        for chunk, sid in zip(chunks, stage_ids):
            inputs, outputs = stage_example_args(sid, num_stages, chunk.config, parallel, micro_batch_size,
                                                 seq_length, bf16)
            self.stages.append(PipelineStage(_StageModule(chunk, use_segments, bf16), sid, num_stages, device,
                                             input_args=inputs, output_args=outputs, group=parallel.group("pp")))
        self.last = next((c for c in chunks if c.post_process), None)
        self.has_first = any(c.pre_process for c in chunks)
        self.parallel, self.total_tokens, self.bf16 = parallel, 1.0, bf16
        cls = SCHEDULES[schedule]
        stages = self.stages[0] if cls is Schedule1F1B else self.stages
        self.schedule = cls(stages, micro_batches, loss_fn=self._loss, scale_grads=False)
        # 1F1B schedules run plain autograd backward, whose gradient accumulation fires the
        # parameters' post-accumulate hooks, so data-parallel buckets can launch during the
        # schedule. Zero-bubble schedules compute weight gradients separately and add them to
        # .grad by hand (torch.distributed.pipelining's stage_backward_weight): no hooks fire and
        # the reduction starts after the schedule.
        self.backward_fires_grad_hooks = schedule in WEIGHT_GRADS_THROUGH_AUTOGRAD

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed token loss of one micro-batch over the step's global loss-token count. The output
        layer runs here, not in the stage, so the fused loss head (no [s, b, V / tp] logits) serves
        pipelines too; it runs under the stages' autocast setting."""
        labels = self.last.context_parallel_slice(labels)  # [b, s/cp], IGNORE_LABEL where masked
        keep = labels != IGNORE_LABEL
        with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            # the weights up front: the fused loss head makes its gradients in the forward (GPTModel.weighted_loss)
            return self.last.weighted_loss(hidden, labels.clamp(min=0), keep.float() / self.total_tokens)

    def run(self, tokens, position_ids, segment_ids, labels, total_tokens: float, train: bool) -> torch.Tensor:
        """All [B_local, s]. Returns this rank's share of the step loss (0 where no last stage)."""
        self.total_tokens = total_tokens
        args = (tokens, position_ids, segment_ids) if self.has_first else ()
        losses: list[torch.Tensor] = []
        target = labels if self.last is not None else None
        if not train and self.v_shaped:  # torch's eval() of these schedules fails: pipeline_eval.py
            losses = self._forward_in_stage_order(args, target)
        else:
            run = self.schedule.step if train else self.schedule.eval
            # return_outputs=False: otherwise the last stage keeps every micro-batch's output until the
            # step ends, to merge outputs we never use (m x [s, b, h] hidden states).
            run(*args, target=target, losses=losses if self.last is not None else None, return_outputs=False)
        if not losses:
            return torch.zeros((), device=tokens.device)
        return torch.stack([loss.detach().float() for loss in losses]).sum()

    def _forward_in_stage_order(self, args: tuple, target: torch.Tensor | None) -> list[torch.Tensor]:
        """The schedule's micro-batches (the same split of dim 0), forward only, stage after stage."""
        def split(t):
            return torch.tensor_split(t, self.micro_batches) if t is not None else [None] * self.micro_batches
        inputs = list(zip(*(split(a) for a in args))) if args else [None] * self.micro_batches
        stages = {stage.stage_index: stage.submod for stage in self.stages}
        return forward_in_stage_order(stages, self.owners, self.parallel.rank("pp"), self.parallel.group("pp"),
                                      list(zip(inputs, split(target))), self._loss, self.stages[0].device)
