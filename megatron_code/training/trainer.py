"""The training loop: data -> forward/backward over micro-batches -> clip -> AdamW -> log,
validate and checkpoint on their intervals. Pretraining and SFT run it as it is (SFT only brings
other data: training/finetune_data.py); DPO subclasses it (training/dpo_trainer.py)."""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from contextlib import nullcontext
from itertools import islice

import numpy as np
import torch

from megatron_code.distributed import DistributedEnv, destroy_distributed, init_distributed
from megatron_code.model import GPTModel
from megatron_code.model.core_attention import pack_documents
from megatron_code.model.fp8 import describe_fp8
from megatron_code.parallel.distributed_optimizer import DistributedOptimizer
from megatron_code.parallel.fused_wgrad import cached_weight_casts
from megatron_code.parallel.grads import (
    GradientReducer, clip_grads_by_norm, global_grad_norm, reduce_sequence_parallel_grads,
)
from megatron_code.parallel.pipeline import (
    IGNORE_LABEL, ModelChunks, PipelineRunner, build_stage_models,
)
from megatron_code.parallel.state import ParallelState, build_parallel_state, virtual_stages
from megatron_code.training import checkpointing
from megatron_code.training.config import RunConfig
from megatron_code.training.data import (
    ResumableBatchSampler, build_datasets, micro_batch_loader, segment_ids_from_eod,
)
from megatron_code.training.garbage_collection import (
    collect_after_validation, collect_if_due, manual_garbage_collection,
)
from megatron_code.training.flops import compute_precision, peak_tflops, training_flops_per_token
from megatron_code.training.lr_schedule import LearningRateSchedule
from megatron_code.training.resume import resume_from_checkpoint
from megatron_code.training.skip_steps import describe_skips, parse_skip_steps
from megatron_code.training.straggler import StragglerReport
from megatron_code.training.launched_step import DeviceScalars, LaunchedStep, StepClock
from megatron_code.training.metrics import MetricsLogger, is_log_step, peak_memory_gib, print_rank0
from megatron_code.training.optimizer import build_optimizer, set_learning_rate
from megatron_code.training.timers import PhaseTimers
from megatron_code.training.exit_signal import ExitSignal
from megatron_code.training.finetune_data import build_finetune_datasets
from megatron_code.training.memory_forecast import describe, fit_advice, running_forecast
from megatron_code.training.validate import validate_job
from megatron_code.training.world import launched_world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """Holds the pieces of one run; `run()` trains to train_iters (or exit_interval)."""

    def __init__(self, cfg: RunConfig, env: DistributedEnv, tokenizer, parallel: ParallelState,
                 exit_signal: ExitSignal | None = None):
        self.cfg, self.env, self.tokenizer, self.parallel = cfg, env, tokenizer, parallel
        self.exit_signal = exit_signal  # None: signals keep their default actions
        seed_everything(cfg.training.seed)
        self.model, self.pipeline = build_model(cfg, parallel, env.device)
        self.params = list(self.model.parameters())
        if cfg.parallel.use_distributed_optimizer:
            # ZeRO-1: the optimizer owns the gradient buffers and reduce-scatters them itself.
            self.optimizer = DistributedOptimizer(self.model, cfg.optimizer, parallel, parallel.dp_cp_group,
                                                  bucket_elements=cfg.parallel.ddp_bucket_size,
                                                  overlap_param_gather=cfg.parallel.overlap_param_gather)
            self.grad_reducer = self.optimizer
        else:
            self.grad_reducer = (GradientReducer(self.params, parallel.dp_cp_group, cfg.parallel.ddp_bucket_size)
                                 if parallel.dp * parallel.cp > 1 else None)
            self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.schedule = LearningRateSchedule(cfg.scheduler, cfg.optimizer, cfg.training.train_iters)
        self.skip_steps = parse_skip_steps(cfg.training.skip_steps, cfg.training.train_iters)
        self.iteration = 0
        self.consumed_samples = 0
        """Training samples read so far: the data position. Not iteration x global batch: a run
        may resume with another --global-batch-size."""
        if cfg.checkpoint.load:
            self.iteration, self.consumed_samples = resume_from_checkpoint(
                cfg, self.model, self.optimizer, parallel, env.is_main)
        self.datasets = self._build_datasets()
        self.flops_per_token = training_flops_per_token(
            cfg.model, cfg.data.seq_length, cfg.model.padded_vocab_size(parallel.tp))
        self.sequences_per_sample = 1  # DPO: a sample is a pair of sequences
        self.precision = compute_precision(cfg.model, cfg.training.bf16)
        self.peak_tflops = peak_tflops(env.device, self.precision, cfg.logging.peak_tflops)
        self.metrics = MetricsLogger(cfg.logging, dataclasses.asdict(cfg), env.is_main, cfg.checkpoint.save,
                                     resumed_at=self.iteration)
        self.history: list[dict] = []
        self.timers = PhaseTimers(env.device)  # megatron_code.profile turns timing/NVTX on
        self.stragglers = (StragglerReport.for_job(cfg.logging.straggler_minmax_count,
                                                   cfg.parallel.distributed_timeout_minutes)
                           if cfg.logging.log_straggler else None)
        self._clock: StepClock | None = None  # the step being launched, with --log-straggler
        self.step_hooks: list = []
        """callables(iteration) run once each step's work is launched, before its record exists
        (records are logged when the step's results reach the host: launched_step.py)."""

    # ---- setup ----------------------------------------------------------------------------
    def _build_datasets(self):
        cfg, need_valid = self.cfg, self.cfg.training.eval_interval > 0
        if cfg.training.training_mode == "pretrain":
            return build_datasets(cfg.data, self.tokenizer, cfg.training.seed, self._split_sizes(), need_valid)
        return build_finetune_datasets(cfg, self.tokenizer, self._split_sizes(), need_valid,
                                       log=lambda line: print_rank0(line, enabled=self.env.is_main))

    def _split_sizes(self) -> list[int]:
        t = self.cfg.training
        eval_samples = t.eval_iters * t.global_batch_size
        train_samples = self.consumed_samples + (t.train_iters - self.iteration) * t.global_batch_size
        return [train_samples, eval_samples, eval_samples]

    def _train_loader(self):
        t = self.cfg.training
        sampler = ResumableBatchSampler(
            len(self.datasets.train), self.consumed_samples,
            t.micro_batch_size, t.global_batch_size, self.parallel.dp_rank, self.parallel.dp,
        )
        loader = micro_batch_loader(self.datasets.train, sampler, self.cfg.data.num_workers,
                                    pin_memory=self.env.device.type == "cuda", seed=t.seed)
        return iter(loader)

    # ---- one step -------------------------------------------------------------------------
    def _forward(self, batch: dict, loss_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The model on one micro-batch, timed as the forward: per-token losses, or with
        loss_weights [b, s] their weighted sum (GPTModel.forward)."""
        # Non-blocking: a blocking host-to-device copy waits for all queued work (the previous
        # micro-batch's backward), leaving the GPU idle while this forward's first kernels launch.
        tokens = batch["tokens"].to(self.env.device, non_blocking=True)
        segment_ids = None
        if self.cfg.data.reset_attention_mask:  # documents found on the host (core_attention.pack_documents)
            segment_ids = pack_documents(segment_ids_from_eod(batch["tokens"], self.tokenizer.eod), self.env.device)
        autocast = (torch.autocast(self.env.device.type, dtype=torch.bfloat16)
                    if self.cfg.training.bf16 else nullcontext())
        with autocast, self.timers.phase("forward"):
            positions, labels = (batch[key].to(self.env.device, non_blocking=True) for key in ("position_ids", "labels"))
            return self.model(tokens, positions, segment_ids, labels=labels, loss_weights=loss_weights)

    def _forward_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed masked loss and number of loss tokens of one micro-batch."""
        losses = self._forward(batch)
        mask = self.model.context_parallel_slice(batch["loss_mask"]).to(self.env.device, dtype=losses.dtype,
                                                                        non_blocking=True)
        return (losses * mask).sum(), mask.sum()

    def _sum_over_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks that see different tokens (data- and context-parallel)."""
        if self.parallel.dp * self.parallel.cp > 1:
            torch.distributed.all_reduce(value, group=self.parallel.dp_cp_group)
        return value

    def _clip_gradients(self) -> torch.Tensor:
        """Complete the gradients (sequence-parallel sums), return the global norm, clip."""
        if isinstance(self.optimizer, DistributedOptimizer):
            return self.optimizer.clip_grad_norm(self.cfg.optimizer.clip_grad)
        reduce_sequence_parallel_grads(self.params, self.parallel)
        grad_norm = global_grad_norm(self.params, self.parallel)
        clip_grads_by_norm(self.params, self.cfg.optimizer.clip_grad, grad_norm, self.optimizer)
        return grad_norm

    def train_step(self, micro_batches: list[dict]) -> tuple[dict[str, torch.Tensor], float]:
        """Gradient accumulation over this rank's share of the global batch. Every micro-batch's
        summed token loss is divided by the loss-token count of the whole global batch (all DP
        ranks), so the summed gradients are the exact global-batch gradient, independent of how
        the batch is cut into micro-batches and ranks. Returns ({loss, grad_norm}: 0-d device
        tensors, not read here), the learning rate applied."""
        self.model.train()
        if self.grad_reducer is not None:  # gradients are views of its buffers (or ZeRO-1's): zeroed in place
            self.grad_reducer.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        total_tokens = self._loss_normalizer(micro_batches)
        self._mark("forward-backward")  # data- and context-parallel ranks leave the loss-token sum together
        with cached_weight_casts(self.model):  # bf16 weight copies shared by the step's micro-batches
            if self.pipeline is not None:  # the schedule runs all micro-batches in one call
                if self.grad_reducer is not None and self.pipeline.backward_fires_grad_hooks:
                    self.grad_reducer.arm(len(micro_batches))  # each chunk's grads accumulate once per micro-batch
                with self.timers.phase("forward-backward"):
                    total_loss = self.pipeline.run(*self._pipeline_inputs(micro_batches), total_tokens, train=True)
            else:
                total_loss = self._accumulate_gradients(micro_batches, total_tokens)
        self._mark("forward-backward done")  # what follows waits for the other ranks
        if self.grad_reducer is not None:
            with self.timers.phase("grad-sync"):  # DP reduction not hidden behind backward
                self.grad_reducer.finish()
        total_loss = self._sum_over_dp(self._sum_over_pp(total_loss))
        with self.timers.phase("grad-clip"):
            grad_norm = self._clip_gradients()
        lr = self.schedule(self.iteration + 1)
        set_learning_rate(self.optimizer, lr)
        with self.timers.phase("optimizer"):
            self.optimizer.step()
        return {"loss": total_loss, "grad_norm": grad_norm}, lr

    def _mark(self, name: str) -> None:
        if self._clock is not None:
            self._clock.mark(name)

    def _loss_normalizer(self, micro_batches: list[dict]) -> float | torch.Tensor:
        """What each micro-batch's summed loss is divided by: the loss tokens of the global batch,
        a number from the host's batches, or a 0-d device tensor where ranks must add theirs up
        (left on the device: reading it back would wait for the previous step's work)."""
        local_tokens = sum(float(self.model.context_parallel_slice(b["loss_mask"]).sum()) for b in micro_batches)
        if self.parallel.dp * self.parallel.cp == 1:
            return local_tokens
        # On the device: NCCL groups reduce only CUDA tensors. A fill, not a blocking copy.
        return self._sum_over_dp(torch.full((), local_tokens, dtype=torch.float64, device=self.env.device))

    def _accumulate_gradients(self, micro_batches: list[dict], total_tokens: float | torch.Tensor) -> torch.Tensor:
        total_loss = torch.zeros((), device=self.env.device)
        for i, batch in enumerate(micro_batches):
            if self.grad_reducer is not None and i == len(micro_batches) - 1:
                self.grad_reducer.arm(1)
            # Weights known before the forward: the fused loss head makes its gradients there.
            weights = batch["loss_mask"].to(self.env.device, dtype=torch.float32, non_blocking=True) / total_tokens
            loss = self._forward(batch, loss_weights=weights)
            with self.timers.phase("backward"):
                loss.backward()
            total_loss += loss.detach()
        return total_loss

    def _pipeline_inputs(self, micro_batches: list[dict]):
        """This rank's micro-batches as whole tensors [B_local, s] for the pipeline schedule, which
        cuts them again; masked labels become IGNORE_LABEL so the loss needs no extra tensor."""
        device = self.env.device
        tokens, positions, labels, mask = (torch.cat([b[key] for b in micro_batches]).to(device, non_blocking=True)
                                           for key in ("tokens", "position_ids", "labels", "loss_mask"))
        labels = labels.masked_fill(mask == 0, IGNORE_LABEL)
        segments = (segment_ids_from_eod(tokens, self.tokenizer.eod) if self.cfg.data.reset_attention_mask
                    else torch.zeros_like(tokens))
        return tokens, positions, segments, labels

    def _sum_over_pp(self, value: torch.Tensor) -> torch.Tensor:
        """The loss lives on the last pipeline stage: share it with every stage."""
        if self.parallel.pp > 1:
            torch.distributed.all_reduce(value, group=self.parallel.group("pp"))
        return value

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the first eval_iters global batches of the validation
        split (the same samples every time, so successive values are comparable)."""
        self.model.eval()
        t = self.cfg.training
        totals = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # [loss sum, loss tokens]
        batches = self._validation_batches()
        if self.pipeline is not None:  # one schedule call per global batch; loss sums, not means
            per_step = t.global_batch_size // (t.micro_batch_size * self.parallel.dp)
            for start in range(0, len(batches), per_step):
                group = batches[start:start + per_step]
                loss = self.pipeline.run(*self._pipeline_inputs(group), 1.0, train=False)
                tokens = sum(float(self.model.context_parallel_slice(b["loss_mask"]).sum()) for b in group)
                totals += torch.stack([self._sum_over_pp(loss).double(), torch.full_like(totals[0], tokens)])
        for batch in batches if self.pipeline is None else []:
            totals += torch.stack([value.double() for value in self._forward_losses(batch)])
        loss_sum, token_count = self._sum_over_dp(totals).tolist()  # the one read: no wait per micro-batch
        return loss_sum / max(token_count, 1.0)

    def _validation_batches(self) -> list[dict]:
        """This rank's micro-batches of the first eval_iters global batches of the validation split."""
        t = self.cfg.training
        sampler = ResumableBatchSampler(len(self.datasets.valid), 0, t.micro_batch_size, t.global_batch_size,
                                        self.parallel.dp_rank, self.parallel.dp)
        micro_batches = t.eval_iters * t.global_batch_size // (t.micro_batch_size * self.parallel.dp)
        return [torch.utils.data.default_collate([self.datasets.valid[i] for i in indices])
                for indices in islice(iter(sampler), micro_batches)]

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train to train_iters. Each step's results are read (and logged) once the next step is
        launched, or at once where the host must know them: before validating, saving, exiting."""
        t, ck = self.cfg.training, self.cfg.checkpoint
        loader = self._train_loader()
        last_saved = self.iteration if ck.load else None
        unread: LaunchedStep | None = None
        while self.iteration < t.train_iters:
            unread = self._advance(loader, unread)
            # ... and at the last step, as Megatron-LM does, so the final weights always get a value
            validating = (bool(t.eval_interval) and self.datasets.valid is not None
                          and (self.iteration % t.eval_interval == 0 or self.iteration == t.train_iters))
            due = bool(ck.save) and bool(ck.save_interval) and self.iteration % ck.save_interval == 0
            exiting = (self.exit_signal is not None and self.exit_signal.stopped_by is not None) or (
                bool(t.exit_interval) and self.iteration % t.exit_interval == 0)
            if unread is not None and (validating or due or exiting or self.iteration == t.train_iters):
                self._finish(unread)  # so a checkpoint never holds a step whose loss was not finite
                unread = None
            if validating:
                self._log_validation()
                collect_after_validation(t)
            self._publish_async_save(wait=False)
            if ck.save and (due or exiting):
                self.save()
                last_saved = self.iteration
            if exiting:
                break
        if ck.save and last_saved != self.iteration:
            self.save()
        self.wait_for_params()
        self._publish_async_save(wait=True)
        if self.exit_signal is not None and self.exit_signal.stopped_by:
            saved = checkpointing.checkpoint_dir(ck.save, self.iteration) if ck.save else None
            print_rank0(self.exit_signal.stop_message(self.iteration, t.train_iters, saved), enabled=self.env.is_main)
        self.memory_per_rank = self._memory_per_rank()
        self.metrics.log_memory(self.memory_per_rank)
        self.metrics.close()
        return self.history

    def _memory_per_rank(self) -> list[dict]:
        """Every rank's peak memory and the bytes of its parameters, gradients and optimizer
        state, gathered to all ranks (a collective)."""
        def nbytes(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)

        if isinstance(self.optimizer, DistributedOptimizer):
            held = self.optimizer.memory_bytes()
        else:
            adam = [v for state in self.optimizer.state.values() for v in state.values()
                    if isinstance(v, torch.Tensor) and v.dim() > 0]
            held = {"params": nbytes(self.params), "grads": nbytes(p.grad for p in self.params if p.grad is not None),
                    "optimizer": nbytes(adam)}
        mine = {"rank": self.env.rank, "peak_mem_gib": peak_memory_gib(self.env.device), **held}
        everyone = [None] * self.env.world_size
        torch.distributed.all_gather_object(everyone, mine)
        return everyone

    def save(self) -> None:
        state = {"consumed_samples": self.consumed_samples,
                 "config": dataclasses.asdict(self.cfg)}
        ck = self.cfg.checkpoint
        self._publish_async_save(wait=True)  # (save_checkpoint would wait too; this also logs it)
        self.wait_for_params()
        path = checkpointing.save_checkpoint(ck.save, self.iteration, self.model, self.optimizer, self.parallel,
                                             state, async_save=ck.async_save, keep_last=ck.keep_last)
        print_rank0(f" {'saving checkpoint (async)' if ck.async_save else 'saved checkpoint'} {path}",
                    enabled=self.env.is_main)

    def wait_for_params(self) -> None:
        """The parameters are final: no all-gather of the last optimizer step in flight."""
        if isinstance(self.optimizer, DistributedOptimizer):
            self.optimizer.wait_for_params()

    def _publish_async_save(self, wait: bool) -> None:
        path = checkpointing.finish_pending_save(wait)
        if path is not None:
            print_rank0(f" saved checkpoint {path}", enabled=self.env.is_main)

    def _advance(self, loader, unread: LaunchedStep | None) -> LaunchedStep | None:
        """Launch the next step, then finish the unread one behind it (waiting for that step
        only: this one stays queued). A step of --skip-steps finishes the unread one first, so
        records stay in step order, and drops its data. Returns the step left unread."""
        if self.iteration + 1 in self.skip_steps:
            if unread is not None:
                self._finish(unread)
            self._skip_step(loader)
            return None
        launched = self._launch_step(loader)
        collect_if_due(self.cfg.training, self.iteration)  # host-side pause while the GPU runs the step
        if unread is not None:
            self._finish(unread)
        return launched

    def _launch_step(self, loader) -> LaunchedStep:
        """Queue one optimizer step (data, forward/backward, clip, AdamW) and the copy of its
        results to the host; read nothing back."""
        t = self.cfg.training
        clock = StepClock(self.env.device)
        self._clock = clock if self.stragglers is not None else None  # marks only where reported
        waiting_since = time.perf_counter()
        with self.timers.phase("data-wait"):
            micro_batches = list(islice(loader, t.global_batch_size // (t.micro_batch_size * self.parallel.dp)))
        data_wait = time.perf_counter() - waiting_since
        values, lr = self.train_step(micro_batches)
        values.update(self.step_tensors())
        if self.exit_signal is not None:
            values["exit_signal"] = self.exit_signal.agreement(self.env.device)  # collective
        clock.stop()
        self.iteration += 1
        self.consumed_samples += t.global_batch_size
        launched = LaunchedStep(self.iteration, lr, DeviceScalars(values), clock, self.consumed_samples,
                                self.timers.pop(), data_wait)
        self._clock = None
        for hook in self.step_hooks:
            hook(self.iteration)
        return launched

    def _skip_step(self, loader) -> None:
        """Read this rank's micro-batches of the step and drop them; the step counts (data
        position, iteration, learning-rate schedule) but updates nothing."""
        t = self.cfg.training
        for _ in islice(loader, t.global_batch_size // (t.micro_batch_size * self.parallel.dp)):
            pass
        self.iteration += 1
        self.consumed_samples += t.global_batch_size
        self.metrics.log_skipped(self.iteration, t.train_iters, self.consumed_samples)

    def _finish(self, step: LaunchedStep) -> None:
        """Read a launched step's results (waiting for its work only), stop on a non-finite loss
        or gradient norm before anything after it is saved, note an agreed exit signal, log the
        step's record."""
        values = step.scalars.read()
        loss, grad_norm = values.pop("loss"), values.pop("grad_norm")
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at iteration {step.iteration}; stopping.")
        if not math.isfinite(grad_norm):
            # The loss was computed before this step's update; the update itself applied the
            # non-finite gradients, so the weights are already lost and must not be saved.
            raise FloatingPointError(
                f"gradient norm is {grad_norm} at iteration {step.iteration} (loss {loss:.4f}): its "
                f"update made the weights non-finite; stopping. Resume from the last checkpoint with "
                f"a lower --lr or a --clip-grad.")
        if self.exit_signal is not None:
            self.exit_signal.decide(values.pop("exit_signal"))
        seconds = step.clock.seconds()
        t = self.cfg.training
        tokens_per_sec = t.global_batch_size * self.sequences_per_sample * self.cfg.data.seq_length / seconds
        tflops = self.flops_per_token * tokens_per_sec / 1e12 / self.env.world_size
        record = {
            "step": step.iteration, "train_iters": t.train_iters, "loss": loss,
            "lr": step.lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
            "ms_per_step": 1000 * seconds, "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
            "peak_mem_gib": peak_memory_gib(self.env.device),
            "consumed_samples": step.consumed_samples,
            **self.step_metrics(values),
        }
        if step.phase_seconds:
            record["phase_ms"] = {name: 1000 * sec for name, sec in step.phase_seconds.items()}
        if self.stragglers is not None:
            self.stragglers.add(step.clock.seconds("forward-backward", "forward-backward done"), step.data_wait_seconds)
            if is_log_step(step.iteration, t.train_iters, self.cfg.logging.log_interval):
                summary = self.stragglers.report()  # rank 0 waits for every rank's numbers
                if summary is not None:
                    record["straggler"] = summary
        self.history.append(record)
        self.metrics.log_step(record)

    def _log_validation(self) -> None:
        self.metrics.log_validation(self.iteration, self.evaluate())

    def step_tensors(self) -> dict[str, torch.Tensor]:
        """Mode-specific 0-d device tensors of the step just launched (DPO's reward sums), read
        back with its loss."""
        return {}

    def step_metrics(self, values: dict[str, float]) -> dict:
        """The step record's mode-specific fields, from `step_tensors`' values read back."""
        return values


def build_model(cfg: RunConfig, parallel: ParallelState, device: torch.device):
    """The whole model, or with pipeline parallelism this rank's stages plus the schedule runner."""
    if parallel.pp == 1:
        return GPTModel(cfg.model, parallel, init_seed=cfg.training.seed).to(device), None
    vp = virtual_stages(cfg.parallel, cfg.model.num_layers)
    schedule = cfg.parallel.pipeline_schedule
    chunks = [c.to(device) for c in build_stage_models(cfg.model, parallel, cfg.training.seed, schedule, vp)]
    t = cfg.training
    micro_batches = t.global_batch_size // (t.micro_batch_size * parallel.dp)
    runner = PipelineRunner(chunks, parallel, schedule, vp, micro_batches, device, cfg.data.reset_attention_mask,
                            bf16=cfg.training.bf16, micro_batch_size=t.micro_batch_size,
                            seq_length=cfg.data.seq_length)
    return ModelChunks(chunks), runner


def train(cfg: RunConfig, prepare=None) -> list[dict]:
    """Validate, set up, train. Returns the per-step metric records. `prepare(trainer)`, if given,
    runs once the trainer is built, before the first step (profiling hooks in)."""
    tokenizer = validate_job(cfg, launched_world_size(cfg.launch, os.environ))
    env = init_distributed(cfg.parallel.distributed_timeout_minutes)
    # from here on: save and exit on the signal (or the time limit)
    exit_signal = ExitSignal(cfg.training.exit_signal, cfg.training.exit_duration_in_mins)
    try:
        # The trainer lives in _build_and_run's frame only, so that it is gone when the
        # process groups are destroyed and freed (destroy_distributed).
        return _build_and_run(cfg, env, tokenizer, exit_signal, prepare)
    finally:
        exit_signal.restore()
        destroy_distributed()


def _build_and_run(cfg: RunConfig, env, tokenizer, exit_signal: ExitSignal, prepare) -> list[dict]:
    trainer_class = Trainer
    if cfg.training.training_mode == "dpo":
        from megatron_code.training.dpo_trainer import DPOTrainer  # it subclasses Trainer

        trainer_class = DPOTrainer
    te_fp8 = cfg.model.fp8_format is not None and cfg.model.fp8_backend == "te"
    parallel = build_parallel_state(cfg.parallel, env.device, fp8_amax_group=te_fp8)
    trainer = trainer_class(cfg, env, tokenizer, parallel, exit_signal)
    _print_summary(trainer)
    if prepare is not None:
        prepare(trainer)
    with manual_garbage_collection(cfg.training):
        return trainer.run()


def _print_summary(trainer: Trainer) -> None:
    cfg, model = trainer.cfg, trainer.model
    n_params = sum(p.numel() for p in model.parameters())
    print_rank0(
        f"model: {cfg.model.num_parameters(trainer.parallel.tp) / 1e6:.2f}M parameters "
        f"({n_params / 1e6:.2f}M on rank 0), {cfg.model.num_layers} layers, hidden "
        f"{cfg.model.hidden_size}, {cfg.model.num_attention_heads} heads / {cfg.model.num_kv_heads} KV, "
        f"vocab {cfg.model.padded_vocab_size(trainer.parallel.tp)} (tokenizer {cfg.model.vocab_size}) | "
        f"{trainer.flops_per_token / 1e9:.3f} GFLOP/token | device {trainer.env.device} | "
        f"{'bf16 autocast' if cfg.training.bf16 else 'fp32'}{describe_fp8(cfg.model)}\n"
        f"layout: {trainer.parallel.world_size} processes = TP {trainer.parallel.tp} x CP {trainer.parallel.cp} "
        f"x PP {trainer.parallel.pp} x DP {trainer.parallel.dp}"
        f"{' + sequence parallel' if trainer.parallel.sequence_parallel else ''}\n"
        f"data: {len(trainer.datasets.train)} train samples of {cfg.data.seq_length} tokens; "
        f"global batch {cfg.training.global_batch_size} = micro {cfg.training.micro_batch_size} x "
        f"{cfg.training.global_batch_size // (cfg.training.micro_batch_size * trainer.parallel.dp)} "
        f"accumulation steps x {trainer.parallel.dp} data-parallel ranks",
        enabled=trainer.env.is_main,
    )
    skips = describe_skips(trainer.skip_steps, trainer.iteration, cfg.training.global_batch_size)
    if skips:
        print_rank0(skips, enabled=trainer.env.is_main)
    if isinstance(trainer.optimizer, DistributedOptimizer):
        print_rank0(f"memory: {trainer.optimizer.memory_summary()}", enabled=trainer.env.is_main)
    device = trainer.env.device
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    forecast = startup_memory_forecast(cfg, trainer.parallel.world_size, device.type, capacity)
    if forecast:
        print_rank0(forecast, enabled=trainer.env.is_main)


def startup_memory_forecast(cfg: RunConfig, world_size: int, device_type: str,
                            capacity_bytes: int | None = None) -> str | None:
    """On GPUs, the planner's forecast of the fullest GPU's memory (what the dry run prints), to
    read against the peak the log lines report; with a warning when it exceeds the GPU's
    capacity, since the first step will then most likely fail out of memory."""
    memory = running_forecast(cfg, world_size, device_type)
    if memory is None:
        return None
    line = f"memory forecast (planner): {describe(memory)}; log lines report the measured peak"
    if capacity_bytes is None or memory.total <= capacity_bytes:
        return line
    return (f"{line}\nWARNING: the forecast exceeds this GPU's {capacity_bytes / 2**30:.1f} GiB: expect an "
            f"out-of-memory error in the first step. To fit: {fit_advice(world_size, cfg.data.seq_length)}")