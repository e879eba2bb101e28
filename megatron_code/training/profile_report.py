"""The numbers of a profiling run (see megatron_code.profile), as a dict and as a printed table."""
from __future__ import annotations

import datetime
import statistics

import torch

from megatron_code.training.config import RunConfig
from megatron_code.training.memory_forecast import running_forecast

PHASE_ORDER = ("data-wait", "forward", "reference-forward", "backward", "forward-backward", "grad-sync", "grad-clip",
               "optimizer")  # reference-forward: DPO's frozen reference model


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _mean_phases(records: list[dict], step_ms: float) -> dict[str, float]:
    """Mean ms per phase over the measured steps, plus `other` (the step's untimed remainder)."""
    names = [n for n in PHASE_ORDER if any(n in r.get("phase_ms", {}) for r in records)]
    if not names:
        return {}
    phases = {n: statistics.fmean(r.get("phase_ms", {}).get(n, 0.0) for r in records) for n in names}
    phases["other"] = max(step_ms - sum(phases.values()), 0.0)
    return phases


def build_report(cfg: RunConfig, trainer, records: list[dict], full_flops_per_token: float,
                 phase_records: list[dict] | None = None) -> dict:
    """records: the measured steps' metric records (warmup excluded), run as in training;
    phase_records: the steps timed phase by phase (their own median; default: records)."""
    phase_records = records if phase_records is None else phase_records
    phase_step_ms = statistics.median(r["ms_per_step"] for r in phase_records) if phase_records else None
    world = trainer.env.world_size
    step_ms = statistics.median(r["ms_per_step"] for r in records)
    # A DPO sample is a pair: two sequences (the trainer's log line counts both too).
    tokens_per_step = cfg.training.global_batch_size * trainer.sequences_per_sample * cfg.data.seq_length
    tokens_per_gpu = tokens_per_step / (step_ms / 1000) / world
    tflops = trainer.flops_per_token * tokens_per_gpu / 1e12
    tflops_full = full_flops_per_token * tokens_per_gpu / 1e12
    peak = trainer.peak_tflops
    memory = getattr(trainer, "memory_per_rank", None) or []
    p = trainer.parallel
    return {
        "date": datetime.date.today().isoformat(),
        "device": _device_name(trainer.env.device), "world_size": world, "torch": torch.__version__,
        "layout": {"tp": p.tp, "pp": p.pp, "cp": p.cp, "dp": p.dp, "sequence_parallel": p.sequence_parallel,
                   "distributed_optimizer": cfg.parallel.use_distributed_optimizer},
        "model": {"num_layers": cfg.model.num_layers, "hidden_size": cfg.model.hidden_size,
                  "ffn_hidden_size": cfg.model.ffn_hidden_size, "heads": cfg.model.num_attention_heads,
                  "kv_heads": cfg.model.num_kv_heads, "parameters": cfg.model.num_parameters(p.tp)},
        "training_mode": cfg.training.training_mode, "mock_data": cfg.data.mock_data,
        "seq_length": cfg.data.seq_length, "micro_batch_size": cfg.training.micro_batch_size,
        "global_batch_size": cfg.training.global_batch_size, "precision": trainer.precision,
        "measured_steps": len(records),
        "step_ms_median": step_ms, "step_ms_min": min(r["ms_per_step"] for r in records),
        "tokens_per_sec_per_gpu": tokens_per_gpu,
        "tflops_per_gpu": tflops, "tflops_per_gpu_full_count": tflops_full,
        "peak_tflops": peak, "mfu": tflops / peak if peak else None,
        "mfu_full_count": tflops_full / peak if peak else None,
        "phase_steps": len(phase_records), "phase_step_ms_median": phase_step_ms,
        "phase_ms": _mean_phases(phase_records, phase_step_ms) if phase_records else {},
        "peak_memory_gib_max_rank": max((m["peak_mem_gib"] for m in memory), default=None),
        "planner_peak_gib": planner_peak_gib(cfg, world, trainer.env.device.type),
        "final_loss": records[-1]["loss"],
    }


def planner_peak_gib(cfg: RunConfig, world_size: int, device_type: str) -> float | None:
    """The planner's forecast of the fullest GPU (docs/planner.md), beside the measured peak."""
    memory = running_forecast(cfg, world_size, device_type)
    return None if memory is None else memory.total / 2**30


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    lay = report["layout"]
    rows = [
        ("device", f"{report['device']} x {report['world_size']}"),
        ("layout", f"TP {lay['tp']} x PP {lay['pp']} x CP {lay['cp']} x DP {lay['dp']}"
                   f"{' +SP' if lay['sequence_parallel'] else ''}{' +distopt' if lay['distributed_optimizer'] else ''}"),
        ("model", f"{report['model']['num_layers']} layers, hidden {report['model']['hidden_size']}, "
                  f"{report['model']['parameters'] / 1e6:,.1f} M params"),
        ("batch", f"seq {report['seq_length']} x micro {report['micro_batch_size']} "
                  f"(global {report['global_batch_size']}), {report['precision']}"),
        ("training", f"{report['training_mode']}{', mock data' if report['mock_data'] else ''}"),
        ("step time (median)", f"{report['step_ms_median']:.1f} ms over {report['measured_steps']} steps"),
        ("tokens/s/GPU", f"{report['tokens_per_sec_per_gpu']:,.0f}"),
        ("TFLOP/s/GPU (causal | full)", f"{report['tflops_per_gpu']:.1f} | {report['tflops_per_gpu_full_count']:.1f}"),
        ("MFU (causal | full)", f"{_fmt(report['mfu'], '.1%')} | {_fmt(report['mfu_full_count'], '.1%')}"
                                f" of {_fmt(report['peak_tflops'], '.0f')} TFLOP/s"),
        ("peak memory (max rank)", f"{_fmt(report['peak_memory_gib_max_rank'], '.2f')} GiB"
                                   + (f" (planner: {report['planner_peak_gib']:.2f})"
                                      if report.get("planner_peak_gib") is not None else "")),
    ]
    if report["phase_ms"]:
        rows.append(("phase-timed steps (median)", f"{report['phase_step_ms_median']:.1f} ms over "
                                                   f"{report['phase_steps']} steps, synchronized at phase edges"))
    for name, ms in report["phase_ms"].items():
        rows.append((f"  {name}", f"{ms:.1f} ms ({ms / report['phase_step_ms_median']:.0%})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)
