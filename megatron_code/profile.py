"""Profiling run: `python -m megatron_code.profile [training flags] [profiling flags]` (also under
torchrun) trains K steps of any preset and layout and prints where the time goes:

    tokens/s/GPU, TFLOP/s/GPU (Megatron's causal count and the full count), MFU against the
    device's dense peak at the run's precision, the step split into data wait, forward, backward,
    gradient sync (DP reduction left exposed after backward), clipping and optimizer, and peak memory.

It also writes a JSON report (--report), a torch.profiler trace per rank for a few steps
(--trace-dir; open in Perfetto or chrome://tracing) and NVTX ranges per phase for Nsight Systems
(--nvtx; run under `nsys profile -t cuda,nvtx`). Without --data-path (--sft-data-path,
--dpo-data-path under --training-mode sft, dpo) it uses --mock-data.
Phase timing synchronizes the GPU at phase edges: each edge leaves the GPU idle while Python
launches the next phase's first kernels, and hides any overlap between phases (on an H200 the
16-layer 7B step took 763 ms timed against 704 ms untimed). So the step time, tokens/s and MFU
come from --profile-steps steps run as in training (no synchronization inside or between steps:
each step's time is measured between CUDA events, training/launched_step.py), and the breakdown
from --phase-steps more steps timed phase by phase, reported with their own median.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from megatron_code.errors import ConfigError
from megatron_code.training.arguments import parse_args
from megatron_code.training.config import RunConfig
from megatron_code.training.dry_run import dry_run_report
from megatron_code.training.flops import training_flops_per_token
from megatron_code.training.profile_report import build_report, format_report
from megatron_code.training.trainer import Trainer, train

PROG = "mcode-profile"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, add_help=False, description=__doc__.split("\n\n")[0])
    group = parser.add_argument_group("profiling (all other flags are the training flags)")
    group.add_argument("--profile-steps", type=int, default=10,
                       help="Measured steps (after warmup), run as in training: step time, tokens/s, MFU, trace.")
    group.add_argument("--phase-steps", type=int, default=3,
                       help="Steps after those, timed phase by phase (synchronizing at phase edges): the breakdown.")
    group.add_argument("--profile-warmup", type=int, default=3, help="Unmeasured steps first (allocator, autotuning).")
    group.add_argument("--trace-dir", default=None, help="Write a torch.profiler trace per rank here.")
    group.add_argument("--trace-steps", type=int, default=2, help="How many measured steps the trace covers.")
    group.add_argument("--trace-ranks", type=int, nargs="+", default=None,
                       help="Only these global ranks write a trace (default: every rank; on hundreds of GPUs "
                            "a few ranks, e.g. 0, say as much at a fraction of the files).")
    group.add_argument("--report", default=None, help="Write the report as JSON to this file.")
    group.add_argument("--nvtx", action="store_true", help="Mark phases as NVTX ranges (for nsys).")
    group.add_argument("--no-phase-timing", action="store_true",
                       help="No phase-timed steps (same as --phase-steps 0); totals only.")
    return parser


def prepare_config(cfg: RunConfig, args: argparse.Namespace) -> None:
    """A profiling run trains warmup + steps iterations, never evaluates or saves."""
    if args.profile_steps < 1 or args.profile_warmup < 0 or args.trace_steps < 0 or args.phase_steps < 0:
        raise ConfigError("--profile-steps must be >= 1; --profile-warmup, --phase-steps and --trace-steps >= 0.")
    if args.trace_steps > args.profile_steps:
        raise ConfigError(f"--trace-steps ({args.trace_steps}) must not exceed --profile-steps "
                          f"({args.profile_steps}): the trace covers measured steps.")
    if args.no_phase_timing:
        args.phase_steps = 0
    mode = cfg.training.training_mode
    if not getattr(cfg.data, "data_path" if mode == "pretrain" else f"{mode}_data_path"):
        cfg.data.mock_data = True  # synthetic documents, or conversations for sft/dpo
    t = cfg.training
    t.train_iters = args.profile_warmup + args.profile_steps + args.phase_steps
    t.eval_interval, t.exit_interval = 0, None
    cfg.checkpoint.save = cfg.checkpoint.save_interval = None
    cfg.scheduler.lr_warmup_iters, cfg.scheduler.lr_decay_iters = 0, None
    cfg.logging.log_interval = max(cfg.logging.log_interval, 1)


class ProfilerHooks:
    """Turns on phase timing, NVTX and the torch.profiler schedule inside the trainer."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.trainer: Trainer | None = None
        self.profiler = None

    def __call__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        trainer.timers.timed = False  # until the measured steps are done (_time_phases_after)
        trainer.timers.nvtx = self.args.nvtx and trainer.env.device.type == "cuda"
        trainer.step_hooks.append(self._time_phases_after)
        ranks = self.args.trace_ranks
        if self.args.trace_dir and self.args.trace_steps and (ranks is None or trainer.env.rank in ranks):
            self.profiler = self._start_profiler(trainer)
            trainer.step_hooks.append(lambda iteration: self.profiler.step())

    def _start_profiler(self, trainer: Trainer):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.env.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(self.args.trace_dir, exist_ok=True)
        path = os.path.join(self.args.trace_dir, f"trace_rank{trainer.env.rank}.json")
        schedule = torch.profiler.schedule(wait=max(self.args.profile_warmup - 1, 0),
                                           warmup=min(self.args.profile_warmup, 1),
                                           active=self.args.trace_steps, repeat=1)
        profiler = torch.profiler.profile(activities=activities, schedule=schedule, record_shapes=False,
                                          on_trace_ready=lambda prof: prof.export_chrome_trace(path))
        profiler.start()
        return profiler

    def _time_phases_after(self, iteration: int) -> None:
        if iteration == self.args.profile_warmup + self.args.profile_steps:
            self.trainer.timers.timed = self.args.phase_steps > 0

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()


def profile(cfg: RunConfig, args: argparse.Namespace) -> dict | None:
    """Run the profiling steps; rank 0 returns the report (other ranks None)."""
    prepare_config(cfg, args)
    hooks = ProfilerHooks(args)
    history = train(cfg, prepare=hooks)
    hooks.stop()
    trainer = hooks.trainer
    if not trainer.env.is_main:
        return None
    vocab = cfg.model.padded_vocab_size(trainer.parallel.tp)
    # The trainer's count may include more than one model's passes (DPO's reference forward):
    # the full count keeps the same ratio to the model's own causal count.
    extra_passes = trainer.flops_per_token / training_flops_per_token(cfg.model, cfg.data.seq_length, vocab)
    full_count = extra_passes * training_flops_per_token(cfg.model, cfg.data.seq_length, vocab, causal=False)
    measured = history[args.profile_warmup:]
    return build_report(cfg, trainer, measured[:args.profile_steps], full_count,
                        phase_records=measured[args.profile_steps:])


def profiling_plan(args: argparse.Namespace) -> str:
    traces = "none"
    if args.trace_dir and args.trace_steps:
        ranks = "every rank" if args.trace_ranks is None else "ranks " + ", ".join(map(str, args.trace_ranks))
        traces = f"{args.trace_steps} measured step(s) from {ranks} -> {args.trace_dir}"
    return (f"== profiling ==\n{args.profile_warmup} warmup + {args.profile_steps} measured + "
            f"{args.phase_steps} phase-timed steps; "
            f"report -> {args.report or 'printed only'}; traces: {traces}; NVTX ranges: {'on' if args.nvtx else 'off'}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:
        argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nTraining flags: see `python -m megatron_code.train --help`.")
        return 0
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = parse_args(rest)
        if cfg.launch.dry_run:  # the job as it would run, started nowhere (launch scripts' dry runs)
            prepare_config(cfg, args)
            print(dry_run_report(cfg))
            print(profiling_plan(args))
            return 0
        report = profile(cfg, args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if report is not None:
        print(format_report(report), flush=True)
        if args.report:
            with open(args.report, "w") as fh:
                json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
